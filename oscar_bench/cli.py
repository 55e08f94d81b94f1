"""oscar-bench: how fast the server's and the client's work runs on this machine, against baselines.

    oscar-bench --out DIR                  # full-size architectures (random weights), on CUDA if present
    oscar-bench --tiny --out DIR           # the same code on the tiny models: seconds on a CPU
    oscar-bench --smoke --out DIR          # full-size architectures, minimal work: proves shapes on a CPU

Writes DIR/bench.json (every measured count and second, the rates and ratios derived from them, the
targets) and DIR/bench.md (the same as tables), rewriting both after every section, and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

from oscar_bench.context import Context
from oscar_bench.report import Document
from oscar_bench.sections import SECTIONS
from oscar_bench.timing import Budget
from oscar_bench.workload import SCALES
from oscar_common.config import OscarConfig
from oscar_common.devices import free_device_memory, resolve_device
from oscar_server.stages.generation import generation_dtype

log = logging.getLogger("oscar.bench")

# The run-config keys that shape what the benchmark times, recorded in bench.json.
RUN_DEFAULTS_SHOWN = ("scheduler", "guidance-scale", "num-inference-steps", "generation-batch-size", "dtype",
                      "compile", "compile-mode", "fuse-qkv", "png-writers", "tf32", "inversion-steps",
                      "inversion-tokens", "inversion-chunk-size", "train-recipe", "train-precision", "epochs",
                      "batch-size", "decode-workers", "classifier-image-size")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="oscar-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for bench.json and bench.md")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny models and little work (CPU, seconds)")
    size.add_argument("--smoke", action="store_true",
                      help="full-size architectures, minimal work (64x64 images, 2 steps, batch 1)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        metavar="SECTION", help=f"which sections to run, of: {' '.join(SECTIONS)} (default: all)")
    parser.add_argument("--budget-seconds", type=float, default=900.0,
                        help="time for the whole run; sections shrink optional work and are skipped past it")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = resolve_device(args.device)
    scale = SCALES["tiny" if args.tiny else "smoke" if args.smoke else "full"]
    config = OscarConfig()  # the defaults a user's run starts from
    budget = Budget(args.budget_seconds)
    doc = Document(meta=_meta(argv, device, scale.mode, config, args.budget_seconds),
                   targets_apply=scale.mode == "full" and device.type == "cuda")
    selected = [name for name in SECTIONS if name in args.sections]  # always in the registry's order
    doc.write(args.out)
    work_dir = Path(tempfile.mkdtemp(prefix="oscar-bench-"))
    threads = torch.get_num_threads()
    if scale.mode == "tiny":
        # Tiny kernels gain nothing from threads, and on a shared CPU idle-spinning threads make them 50x slower.
        torch.set_num_threads(1)
    doc.meta["machine"]["torch_threads"] = torch.get_num_threads()
    try:
        for i, name in enumerate(selected):
            section = SECTIONS[name]
            later = sum(SECTIONS[s].expected_seconds.get(scale.mode, 0.0) for s in selected[i + 1:])
            ctx = Context(device=device, scale=scale, config=config, budget=budget, doc=doc,
                          work_dir=work_dir / name, reserved_seconds=later)
            doc.columns[name] = section.columns
            doc.record(name, *run_section(name, section, ctx))
            doc.meta["elapsed_seconds"] = budget.elapsed()
            doc.write(args.out)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work_dir, ignore_errors=True)
    print(doc.markdown())
    return 0


def run_section(name: str, section, ctx: Context) -> tuple[dict[str, Any], Sequence]:
    """(the section's recorded result, its ratio specs): ok, failed (with the error), or skipped."""
    needs = section.expected_seconds.get(ctx.scale.mode, 0.0)
    if ctx.budget.remaining() <= needs / 2:
        # Half of what it usually takes: a section that cannot finish in time would only delay the report.
        log.warning("section %s skipped: %.0f s of the budget left, it usually takes %.0f s", name,
                    ctx.budget.remaining(), needs)
        return {"status": "skipped", "reason": f"{max(0.0, ctx.budget.remaining()):.0f} s of the "
                                               f"{ctx.budget.seconds:.0f} s budget left; it usually takes "
                                               f"{needs:.0f} s"}, ()
    log.info("section %s: starting (%.0f s of budget left)", name, ctx.budget.remaining())
    started = ctx.budget.elapsed()
    try:
        result = section.run(ctx)
    except Exception as exc:  # one section's failure must not cost the others their results
        log.exception("section %s failed", name)
        free_device_memory(ctx.device)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "seconds": ctx.budget.elapsed() - started}, ()
    result = {"status": "ok", **result, "seconds": ctx.budget.elapsed() - started}
    log.info("section %s: %s in %.1f s", name, result["status"], result["seconds"])
    return result, section.ratios


def _meta(argv: Sequence[str] | None, device: torch.device, mode: str, config: OscarConfig,
          budget_seconds: float) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "mode": mode,
        "budget_seconds": budget_seconds,
        "elapsed_seconds": 0.0,
        "machine": {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": version("diffusers"),
                     "transformers": version("transformers"), "accelerate": version("accelerate")},
        "device": {"type": device.type, "name": props.name if props else platform.processor() or "cpu",
                   "memory_gb": props.total_memory / 1e9 if props else None,
                   "multiprocessors": props.multi_processor_count if props else None},
        "dtypes": {"official": "float32", "project": str(generation_dtype(config.dtype, device)).removeprefix("torch."),
                   "peak_matmul": "bfloat16" if cuda else "float32"},
        "run_defaults": {k: v for k, v in config.to_dict().items() if k in RUN_DEFAULTS_SHOWN},
        "scale": SCALES[mode].to_dict(),
    }


if __name__ == "__main__":
    sys.exit(main())
