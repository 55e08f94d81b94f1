"""Step (a) of scripts/gpu-check.sh: the real server stages on a run directory made on this machine.

    python scripts/gpu_check.py stages --work DIR --out OUT [--tiny] [--device cuda] [--set key=value ...]

1. Models: SD-1.4 and CLIP ViT-B/32 with random weights under their hub ids in DIR/hf-cache, a random
   ResNet-18 as the ImageNet weights in DIR/torch-home (oscar_bench.hub_export); nothing is downloaded.
2. A run directory DIR/run as the ServerApp leaves it after the upload round: CLIENTS clients with
   CLASSES_PER_CLIENT classes each (of CLASSES), their means random unit vectors stored through the
   upload codec (oscar_common.wire.Upload + RunDirectory.save_payload), the run's defaults otherwise.
3. ``python -m oscar_server.stages.synthesize DIR/run`` (compile and every speed switch at their defaults),
   ``python -m oscar_server.stages.train DIR/run``, then ``oscar_server.stages.synthesize`` again, which must generate
   nothing (resume). Each runs with ``TORCH_LOGS=recompiles``: any "Recompiling function" line fails.

Writes one Markdown table row per check to OUT/summary.md (appended, so the shell script's other steps
add theirs), the stage summaries to OUT/, and each stage's log to OUT/stages.log. Exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout: the project need not be installed

from oscar_bench.hub_export import export_server_models, save_imagenet_resnet18_stand_in  # noqa: E402
from oscar_common.config import OscarConfig  # noqa: E402
from oscar_common.wire import Upload  # noqa: E402
from oscar_demo.tiny import CLIP_ID, offline_hub_env  # noqa: E402
from oscar_server.run_dir import RunDirectory  # noqa: E402

CLASSES, CLIENTS, CLASSES_PER_CLIENT, IMAGES_PER_CLASS = 100, 2, 50, 2  # 100 means, 200 images
RECOMPILE = re.compile(r"Recompiling function")


def make_run_dir(root: Path, cfg: OscarConfig, *, clients: int, classes_per_client: int, seed: int = 0) -> RunDirectory:
    """A finished upload round: client k holds classes [k * per, (k + 1) * per) modulo the class count."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    run_dir = RunDirectory(root)
    run_dir.save_config(cfg)
    accepted = []
    for k in range(clients):
        class_ids = np.sort(np.arange(k * classes_per_client, (k + 1) * classes_per_client) % len(cfg.class_names))
        means = rng.standard_normal((len(class_ids), 512)).astype(np.float32)
        means /= np.linalg.norm(means, axis=1, keepdims=True)  # what CLIP's normalised means look like
        upload = Upload(class_ids=class_ids, means=means, scheme="pooled", encoder_id=CLIP_ID,
                        client_name=f"client-{k}")
        run_dir.save_payload(upload, node_id=k)
        accepted.append((k, upload.client_name, int(means.nbytes)))
    run_dir.save_upload_round(accepted, [])
    return run_dir


def run_stage(module: str, run_root: Path, env: dict[str, str], log_path: Path, label: str) -> tuple[int, int, float]:
    """(exit code, recompilation lines, seconds) of ``python -m module RUN_DIR``; its output goes to the log."""
    started = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"\n===== {label}: python -m {module} {run_root}\n")
        log.flush()
        process = subprocess.run([sys.executable, "-m", module, str(run_root)], cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    text = log_path.read_text(errors="replace").split(f"===== {label}:")[-1]
    return process.returncode, len(RECOMPILE.findall(text)), seconds


class Summary:
    """OUT/summary.md: one row per check, written as each finishes (a timed-out run still says how far it got)."""

    def __init__(self, path: Path) -> None:
        self.path, self.failed = path, 0
        if not path.exists():
            path.write_text("| step | check | result | figures |\n|---|---|---|---|\n")

    def row(self, step: str, check: str, passed: bool, figures: str) -> None:
        self.failed += not passed
        with self.path.open("a") as f:
            f.write(f"| {step} | {check} | {'passed' if passed else 'FAILED'} | {figures} |\n")
        print(f"[gpu-check] {step} {check}: {'passed' if passed else 'FAILED'}: {figures}", flush=True)


def _gb(value: float | None) -> str:
    return "n/a off CUDA" if value is None else f"{value:.1f} GB"


def stages(args: argparse.Namespace) -> int:
    work, out = args.work.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(out / "summary.md")
    device = torch.device(args.device)
    env = {**os.environ, **offline_hub_env(work / "hf-cache"), "TORCH_HOME": str(work / "torch-home"),
           "TORCH_LOGS": "recompiles", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                os.environ.get("PYTHONPATH")]))}

    # 1. Models, saved once per work folder.
    started = time.monotonic()
    os.environ["TORCH_HOME"] = env["TORCH_HOME"]
    export_server_models(work / "hf-cache", device, tiny=args.tiny)
    save_imagenet_resnet18_stand_in()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the stages run in their own processes
    summary.row("a", "models exported", True, f"{'tiny' if args.tiny else 'full-size'} SD-1.4, CLIP ViT-B/32, "
                f"ResNet-18 in {time.monotonic() - started:.0f} s")

    # 2. The run directory after an upload round.
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = OscarConfig.from_run_config({
        "class-names": ",".join(f"class_{i:03d}" for i in range(args.classes)), "device": args.device,
        "images-per-class": args.images_per_class, "run-dir": str(work), "run-name": "run", **overrides})
    run_root = work / "run"
    if not (run_root / "uploads.json").exists():
        make_run_dir(run_root, cfg, clients=args.clients, classes_per_client=args.classes_per_client)
    expected = args.clients * args.classes_per_client * args.images_per_class

    # 3. The stages, as a user would run them by hand.
    log_path = out / "stages.log"
    for label, module in (("synthesis", "oscar_server.stages.synthesize"), ("training", "oscar_server.stages.train"),
                          ("synthesis again", "oscar_server.stages.synthesize")):
        code, recompiles, seconds = run_stage(module, run_root, env, log_path, label)
        stage = "training" if label == "training" else "synthesis"
        record_path = run_root / "stages" / f"{stage}-summary.json"
        record = json.loads(record_path.read_text()) if record_path.exists() and code == 0 else {}
        if label != "synthesis again":
            (out / record_path.name).write_text(json.dumps(record, indent=2))
        if label == "synthesis":
            passed = code == 0 and record.get("generated") == expected and recompiles == 0
            figures = (f"exit {code}; {record.get('generated')} of {expected} images, "
                       f"{record.get('images_per_second', 0):.2f} img/s at batch {record.get('batch_size')} "
                       f"({record.get('dtype')}), compile {record.get('compile_seconds', 0):.0f} s, "
                       f"peak {_gb(record.get('peak_memory_gb'))}, {recompiles} recompilations, stage {seconds:.0f} s")
        elif label == "training":
            passed = code == 0 and record.get("status") == "trained"
            figures = (f"exit {code}; {record.get('images')} images x {record.get('epochs')} epochs, "
                       f"{record.get('images_per_second', 0):.0f} img/s ({record.get('precision')}), decode "
                       f"{record.get('decode_seconds', 0):.1f} s, peak {_gb(record.get('peak_memory_gb'))}, "
                       f"stage {seconds:.0f} s")
        else:
            passed = code == 0 and record.get("generated") == 0 and recompiles == 0
            figures = (f"exit {code}; generated {record.get('generated')} (resume: 0 expected), "
                       f"{recompiles} recompilations, stage {seconds:.0f} s")
        summary.row("a", label, passed, figures)
    return 1 if summary.failed else 0


def federation_check(report_path: Path | None, device: str) -> tuple[bool, str]:
    """Step (b): the demo's report must say ``completed`` with every server stage on ``device``."""
    if report_path is None or not report_path.is_file():
        return False, "no report.json"
    report = json.loads(report_path.read_text())
    devices = sorted({d for stage in report.get("stages", []) for d in stage.get("devices") or []})
    on_device = bool(devices) and all(d.startswith(device) for d in devices)
    clients = [c for c in report.get("clients", []) if c.get("test_accuracy") is not None]
    return (report["status"] == "completed" and on_device,
            f"status {report['status']}, {len(clients)} clients evaluated, stages on {', '.join(devices) or '?'}")


def bench_check(bench_json: Path) -> tuple[bool, str]:
    """Step (c): every section ran, and each target's figure, projected or measured, met or missed."""
    if not bench_json.is_file():
        return False, "no bench.json"
    doc = json.loads(bench_json.read_text())
    statuses = [f"{name} {section['status']}" for name, section in doc["sections"].items()]
    targets = [f"{t['name']}: {t['value']:.4g} {t['unit']}{' (projected)' if t.get('projected') else ''} "
               f"{'met' if t['met'] else 'MISSED'}" for t in doc["targets"] if t["value"] is not None]
    failed = [name for name, section in doc["sections"].items() if section["status"] == "failed"]
    return not failed, f"{', '.join(statuses)}. Targets: {'; '.join(targets) or 'none measured'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stages", help="step (a): export models, make a run dir, run the stages")
    p.add_argument("--work", type=Path, required=True, help="models, run dir (kept between calls)")
    p.add_argument("--out", type=Path, required=True, help="summary.md, stage summaries, stages.log")
    p.add_argument("--tiny", action="store_true", help="tiny configs (a CPU test of this script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--classes", type=int, default=CLASSES)
    p.add_argument("--clients", type=int, default=CLIENTS)
    p.add_argument("--classes-per-client", type=int, default=CLASSES_PER_CLIENT)
    p.add_argument("--images-per-class", type=int, default=IMAGES_PER_CLASS)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    for name, help_text in (("federation", "step (b): check the demo's report.json"),
                            ("bench", "step (c): check oscar-bench's bench.json")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--out", type=Path, required=True, help="the folder holding summary.md")
        q.add_argument("--seconds", type=float, required=True, help="how long the step took")
        q.add_argument("--exit-code", type=int, required=True, help="the step's exit code")
        q.add_argument("path", type=Path, nargs="?", help="report.json / bench.json")
        if name == "federation":
            q.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.command == "stages":
        return stages(args)
    if args.command == "federation":
        step, check, (passed, figures) = "b", "federation, tiny models", federation_check(args.path, args.device)
    else:
        step, check, (passed, figures) = "c", "oscar-bench", bench_check(args.path)
    passed = passed and args.exit_code == 0
    summary = Summary(args.out / "summary.md")
    summary.row(step, check, passed, f"exit {args.exit_code}; {figures}; {args.seconds:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
