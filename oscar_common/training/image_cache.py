"""Training images decoded once into one uint8 tensor, so an epoch costs no PNG decoding at all.

Decoding a 512x512 PNG takes milliseconds of CPU per image, every epoch, while a GPU trains ResNet-18 on
thousands of images a second (docs/performance.md): the decoder, not the GPU, sets the pace. So each image
is decoded and resized once, in DataLoader worker processes, into a ``[N, 3, side, side]`` uint8 tensor
that lives on the training device (1 GB for 5,400 images at 256); cropping, flipping and normalising then
happen there (:mod:`oscar_common.training.augmentation`).

Several processes (one per GPU) each decode an interleaved share and exchange the results, so every image
is decoded once in all. Unreadable images are skipped, counted and named in the log, never fatal.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from oscar_common.data.local import UNREADABLE, open_rgb
from oscar_common.logs import progress

logger = logging.getLogger(__name__)

ImageSource = Path | str | Image.Image


@dataclass
class ImageCache:
    """``images[i]`` (uint8, CHW) has label ``labels[i]``; ``unreadable`` lists what was skipped."""

    images: torch.Tensor  # [N, 3, side, side] uint8, on the training device
    labels: torch.Tensor  # [N] int64, same device
    unreadable: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def side(self) -> int:
        return int(self.images.shape[-1])


class _Decode(Dataset):
    """Item ``i``: (i, uint8 CHW image or an empty tensor, error text)."""

    def __init__(self, sources: Sequence[ImageSource], indices: Sequence[int], side: int) -> None:
        self.sources, self.indices, self.side = sources, list(indices), side

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, str]:
        index = self.indices[position]
        source = self.sources[index]
        try:
            image = source.convert("RGB") if isinstance(source, Image.Image) else open_rgb(Path(source))
        except UNREADABLE as exc:
            return index, torch.empty(0, dtype=torch.uint8), f"{exc}"
        # A square of ``side``: synthetic images are square; others are squashed, as Resize((s, s)) does.
        image = image.resize((self.side, self.side), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.uint8)
        return index, torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), ""


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> list[tuple[int, torch.Tensor, str]]:
    return items  # images of failed decodes are empty: keep the list, stack later


def decode_images(
    sources: Sequence[ImageSource],
    labels: Sequence[int],
    *,
    side: int,
    device: torch.device | str,
    num_workers: int,
    names: Sequence[str] | None = None,
) -> ImageCache:
    """Decode every source (a path or a PIL image) once to RGB ``side`` x ``side``; skip unreadable ones.

    In a process group (torchrun / accelerate launch) every rank decodes ``sources[rank::world]`` and the
    shares are all-gathered, so each rank ends with the same cache. ``names`` name the sources in logs
    (default: their paths).
    """
    started = time.perf_counter()
    if len(sources) != len(labels):
        raise ValueError(f"{len(sources)} images but {len(labels)} labels")
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(sources)
    share = math.ceil(n / world) if n else 0
    local = torch.zeros(share, 3, side, side, dtype=torch.uint8)
    ok = torch.zeros(share, dtype=torch.uint8)
    errors: dict[int, str] = {}
    loader = DataLoader(_Decode(sources, range(rank, n, world), side), batch_size=16, num_workers=num_workers,
                        collate_fn=_collate)
    for batch in progress(loader, desc="decode images", unit="batch", leave=False, logger=logger):
        for index, image, error in batch:
            if error:
                errors[index] = error
            else:
                local[index // world] = image
                ok[index // world] = 1
    if world > 1:
        local, ok = _all_gather_shares(local.to(device), ok.to(device), world, n)
    errors = _all_errors(errors, world)
    unreadable = [_name(sources, names, index) for index in sorted(errors)]
    if rank == 0:
        for index in sorted(errors):
            logger.warning("skipping unreadable image %s: %s", _name(sources, names, index), errors[index])
        if errors:
            logger.warning("skipped %d unreadable image(s) of %d", len(errors), n)
    images, label_tensor = local[:n], torch.as_tensor(list(labels), dtype=torch.int64)
    if errors:
        keep = ok[:n].bool().cpu()
        images, label_tensor = images[keep.to(images.device)], label_tensor[keep]
    return ImageCache(images=images.to(device), labels=label_tensor.to(device),
                      unreadable=unreadable, seconds=time.perf_counter() - started)


def decode_workers(setting: int, images: int, processes: int) -> int:
    """``decode-workers``: as set, or for -1 none for a few images (starting workers costs more than it
    saves) and otherwise the CPUs this process may use, shared with the other processes."""
    if setting >= 0:
        return setting
    if images < 64:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // processes - 1))


def _all_gather_shares(local: torch.Tensor, ok: torch.Tensor, world: int,
                       n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r holds images r, r+W, r+2W, ...: gather every share and interleave them back into order."""
    shares = [torch.empty_like(local) for _ in range(world)]
    flags = [torch.empty_like(ok) for _ in range(world)]
    dist.all_gather(shares, local)
    dist.all_gather(flags, ok)
    # stack -> [W, share, ...]; transpose -> [share, W, ...]; row-major flattening gives index j*W + r.
    images = torch.stack(shares, 1).flatten(0, 1)[:n]
    return images, torch.stack(flags, 1).flatten(0, 1)[:n]


def _all_errors(errors: dict[int, str], world: int) -> dict[int, str]:
    if world == 1:
        return errors
    gathered: list[dict[int, str] | None] = [None] * world
    dist.all_gather_object(gathered, errors)
    return {k: v for part in gathered for k, v in (part or {}).items()}


def _name(sources: Sequence[ImageSource], names: Sequence[str] | None, index: int) -> str:
    if names is not None:
        return names[index]
    source = sources[index]
    return f"<in-memory image {index}>" if isinstance(source, Image.Image) else str(source)
