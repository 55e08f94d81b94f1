"""The synthesis fidelity's cost: CLIP ViT-B/32's vision tower at 224, as the synthesis stage runs it after
generating (:mod:`oscar_server.stages.image_embedding`: the run's device and dtype, its batch size).

Two rows: the tower alone on ready pixel batches (``tower``), and the stage's whole path on PNG files
(decoding in threads, CLIP's preprocessing, the tower: ``files``), which is what a run pays per image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from oscar_bench.architectures import build_clip_vision_tower
from oscar_bench.context import Context
from oscar_bench.report import Column
from oscar_bench.timing import timed
from oscar_common.devices import free_device_memory
from oscar_server.stages.generation import generation_dtype
from oscar_server.stages.image_embedding import embed_image_files, embed_pixels, embedding_batch_size

COLUMNS = (Column("path", "name"), Column("dtype", "dtype"), Column("batch", "batch_size"),
           Column("images", "images"), Column("seconds", "seconds"), Column("img/s", "img_per_s"),
           Column("ms/image", "ms_per_image"))


def run(ctx: Context) -> dict[str, Any]:
    processor, model = build_clip_vision_tower(ctx.device, tiny=ctx.tiny)
    dtype = generation_dtype(ctx.config.dtype, ctx.device)
    try:
        rows = _measure(ctx, processor, model.to(dtype))
    finally:
        del model
        free_device_memory(ctx.device)
    return {"rows": rows, "notes": [
        f"CLIP ViT-B/32 vision tower ({'tiny stand-in' if ctx.tiny else 'full size, random weights'}), "
        f"{str(dtype).removeprefix('torch.')}; the stage embeds every synthetic image once after generation (a "
        "rerun embeds only new images)"]}


def _measure(ctx: Context, processor: CLIPImageProcessor, model: CLIPVisionModelWithProjection) -> list[dict[str, Any]]:
    size = model.config.image_size
    batch = min(embedding_batch_size(ctx.device), ctx.scale.fidelity_images)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    embed_pixels(pixels, model)  # kernel selection and allocations stay out of the timing
    batches = math.ceil(ctx.scale.fidelity_images / batch)
    _, seconds = timed(lambda: [embed_pixels(pixels, model) for _ in range(batches)], ctx.device)
    rows = [_row("tower", f"vision tower, ready {size}x{size} pixels", model.dtype, batch, batches * batch, seconds)]

    paths = _pngs(ctx, ctx.scale.fidelity_files)
    file_batch = min(embedding_batch_size(ctx.device), len(paths))
    _, seconds = timed(lambda: embed_image_files(paths, processor, model, file_batch), ctx.device)
    rows.append(_row("files", f"stage path: {ctx.scale.png_size}px PNG -> decode, preprocess, tower", model.dtype,
                     file_batch, len(paths), seconds))
    return rows


def _row(key: str, name: str, dtype: torch.dtype, batch: int, images: int, seconds: float) -> dict[str, Any]:
    return {"key": key, "name": name, "dtype": str(dtype).removeprefix("torch."), "batch_size": batch,
            "images": images, "seconds": seconds, "img_per_s": images / seconds,
            "ms_per_image": 1000 * seconds / images}


def _pngs(ctx: Context, count: int) -> list[Path]:
    """``count`` noise PNGs at the run's image size (noise compresses worst: the slowest decode)."""
    folder = ctx.work_dir / "fidelity"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.png"
        Image.fromarray(rng.integers(0, 256, (ctx.scale.png_size, ctx.scale.png_size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
