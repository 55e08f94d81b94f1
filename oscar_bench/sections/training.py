"""Classifier training: the project's training path on PNG files against the same model fed from memory.

The PNGs stand in for synthetic images: smooth random colour fields with pixel noise, so they decode at
about the cost of real 512x512 Stable Diffusion outputs (pure noise would not compress; flat colour would
compress to nothing). The project's path is timed over the epochs after the first (the first warms up
cuDNN and fills any decode cache). The baseline trains the same ResNet-18 on batches already on the
device (bf16 autocast and channels_last on CUDA): the ceiling that data loading is measured against.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from oscar_bench.architectures import build_resnet18
from oscar_bench.context import Context
from oscar_bench.project import project_train
from oscar_bench.report import Column, RatioSpec
from oscar_bench.timing import timed
from oscar_common.devices import free_device_memory

COLUMNS = (Column("path", "name"), Column("batch", "batch_size"), Column("size", "image_size"),
           Column("images", "images"), Column("seconds", "seconds"), Column("img/s", "img_per_s"),
           Column("first epoch s", "first_epoch_seconds"))

RATIOS = (
    RatioSpec("project / same-batch baseline (img/s)", "training.project.img_per_s", "training.baseline.img_per_s"),
    RatioSpec("project / large-batch baseline (img/s)", "training.project.img_per_s",
              "training.baseline_large.img_per_s"),
)

NUM_CLASSES = 90  # DomainNet's, as the official code trains it


def run(ctx: Context) -> dict[str, Any]:
    scale = ctx.scale
    image_size = scale.train_image_size or ctx.config.classifier_image_size
    folder = ctx.work_dir / "train-pngs"
    items, png_seconds = timed(lambda: write_pngs(folder, scale.train_images, scale.png_size, NUM_CLASSES),
                               ctx.device)
    rows = [{"key": "png_write", "name": f"write {scale.png_size}px PNGs ({os.cpu_count()} threads)",
             "images": len(items), "seconds": png_seconds, "img_per_s": len(items) / png_seconds}]

    times = project_train(items, num_classes=NUM_CLASSES, image_size=image_size, epochs=scale.train_epochs,
                          device=ctx.device, config=ctx.config)
    images = times.epochs * len(items)
    rows.append({"key": "project", "name": f"project: training path from PNGs ({times.num_workers} workers)",
                 "batch_size": times.batch_size, "image_size": image_size, "images": images,
                 "seconds": times.seconds, "img_per_s": images / times.seconds,
                 "first_epoch_seconds": times.first_epoch_seconds, "epochs": times.epochs})

    for key, batch in (("baseline", times.batch_size), ("baseline_large", scale.baseline_batch)):
        seconds = _baseline_seconds(ctx.device, batch=batch, image_size=image_size,
                                    iterations=scale.baseline_iterations)
        images = batch * scale.baseline_iterations
        rows.append({"key": key, "name": f"same model, batch already on {ctx.device.type}", "batch_size": batch,
                     "image_size": image_size, "images": images, "seconds": seconds, "img_per_s": images / seconds})
    free_device_memory(ctx.device)
    precision = "bf16 autocast, channels_last" if ctx.device.type == "cuda" else "float32"
    return {"rows": rows, "notes": [f"{len(items)} PNGs of {scale.png_size}x{scale.png_size}, {NUM_CLASSES} classes, "
                                    f"ResNet-18 from scratch (same cost as ImageNet weights); project: "
                                    f"{ctx.config.train_recipe} recipe, precision {times.precision}",
                                    f"baseline: SGD steps on random batches on the device ({precision})"]}


def write_pngs(folder: Path, count: int, size: int, num_classes: int) -> list[tuple[Path, int]]:
    """``count`` PNGs of ``size`` x ``size`` in ``folder`` (written in parallel); (path, label) pairs."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> tuple[Path, int]:
        rng = np.random.default_rng(i)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size),
                                                                                        Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        return path, i % num_classes

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(write, range(count)))


def _baseline_seconds(device: torch.device, *, batch: int, image_size: int, iterations: int) -> float:
    """Seconds of ``iterations`` SGD steps of ResNet-18 on a batch already on ``device``, after 3 warm-ups."""
    cuda = device.type == "cuda"
    model = build_resnet18(NUM_CLASSES, device)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    inputs = torch.randn(batch, 3, image_size, image_size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    _, seconds = timed(lambda: [step() for _ in range(iterations)], device)
    return seconds
