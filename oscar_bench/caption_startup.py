"""A client's captioning start-up against a stand-in GPU: how long the device waits for its first images.

    python -m oscar_bench.caption_startup --runs 3 --workers 1 --threads 1

The captioner is BLIP-base's published architecture with random weights (``oscar_bench.client``), saved
once as a checkpoint in ``--work`` and loaded from there by the project's loaders, as a client loads its
captioner; ``generate`` is replaced by a sleep as long as a GPU would take (``--rate`` images per second:
by default the H200's bare BLIP-base rate at batch 128). So the stage's time is the device's plus whatever
the data path makes it wait, measurable on a machine without a GPU. Printed per run (one JSON line each):
when the model load started and ended, when the first ``generate`` started and how long after the load,
and the whole stage against the stand-in device's own time.

``--threads 1`` keeps the model load on one core, as on a GPU machine where it is mostly I/O and a copy to
the device and leaves the other cores to the decoding workers; on a 2-core machine with more threads, the
load and the workers only take turns. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from oscar_bench.client import random_blip_base, write_photo_jpegs
from oscar_client import captioning
from oscar_common.models.loading import load_captioner_model, load_captioner_processor

CPU = torch.device("cpu")


def prepare(work: Path, images: int) -> tuple[Path, list[Path]]:
    """The checkpoint and the JPEGs, made once in ``work`` and reused by later runs."""
    checkpoint, folder = work / "blip-base-random", work / "images"
    if not (checkpoint / "config.json").exists():
        processor, model = random_blip_base(CPU, torch.float16)
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
    paths = sorted(folder.glob("*.jpg"))
    if len(paths) < images:
        shutil.rmtree(folder, ignore_errors=True)
        paths = write_photo_jpegs(folder, images)
    return checkpoint, paths[:images]


def one_run(checkpoint: Path, paths: list[Path], *, rate: float, batch_size: int, workers: int) -> dict[str, float]:
    events: dict[str, float] = {}

    def stand_in_generate(self, pixel_values: torch.Tensor, *, max_new_tokens: int) -> list[str]:
        events.setdefault("first_generate", time.perf_counter())
        time.sleep(len(pixel_values) / rate)
        return ["a caption"] * len(pixel_values)

    def load_model() -> torch.nn.Module:
        events["load_start"] = time.perf_counter()
        model = load_captioner_model(str(checkpoint), CPU, torch.float32)
        events["load_end"] = time.perf_counter()
        return model

    captioning.Captioner.generate = stand_in_generate
    settings = captioning.caption_settings("stand-in", revision="bench", dtype=torch.float32, max_new_tokens=1)
    started = time.perf_counter()
    run = captioning.caption_files(paths, settings=settings, cache=None, batch_size=batch_size, num_workers=workers,
                                   max_new_tokens=1, device=CPU, load_model=load_model,
                                   load_processor=lambda: load_captioner_processor(str(checkpoint)))
    total = time.perf_counter() - started
    return {
        "model_load_s": [round(events["load_start"] - started, 3), round(events["load_end"] - started, 3)],
        "first_generate_s": round(events["first_generate"] - started, 3),
        "first_generate_after_load_s": round(events["first_generate"] - events["load_end"], 3),
        "stage_s": round(total, 3),
        "device_s": round(run.captioned / rate, 3),
        "images": run.captioned,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/oscar-caption-startup"),
                        help="where the checkpoint (470 MB) and the images are kept between runs")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="decoding workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--rate", type=float, default=319.0, help="the stand-in device's images per second")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint, paths = prepare(args.work, args.images)
    for _ in range(args.runs):
        result = one_run(checkpoint, paths, rate=args.rate, batch_size=args.batch_size, workers=args.workers)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
