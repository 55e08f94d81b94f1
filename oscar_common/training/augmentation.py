"""Per-sample random crops and flips on the training device, drawn from (seed, epoch, sample index).

Each epoch has a plan: the order in which the samples are visited and, for augmented recipes, one
RandomResizedCrop box and one flip per sample. The plan is drawn for the whole data set at the start of the
epoch from a generator seeded by (seed, epoch), and sample ``i``'s crop is row ``i`` of it. So what a
sample looks like depends only on (seed, epoch, i): not on its batch, its neighbours, how many processes
share the epoch, or whether the run was resumed. The boxes follow torchvision's RandomResizedCrop
(10 attempts at a random area and aspect ratio, else the whole image), vectorised over samples.

The crops are applied to a whole batch at once with ``torchvision.ops.roi_align``: one box per sample,
bilinear sampling with an adaptive number of points per output pixel (ceil(box side / output side)), so a
crop that is shrunk is averaged rather than aliased. Flip and normalisation follow, all on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.ops import roi_align


@dataclass
class EpochPlan:
    order: torch.Tensor  # [N] int64: the epoch's visiting order (a permutation of the sample indices)
    boxes: torch.Tensor | None  # [N, 4] float32 crop (x1, y1, x2, y2) of sample i in its cached image
    flips: torch.Tensor | None  # [N] bool: flip sample i horizontally


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def plan_epoch(*, seed: int, epoch: int, num_samples: int, side: int, augment: bool,
               crop_scale: Sequence[float], crop_ratio: Sequence[float]) -> EpochPlan:
    """The order and per-sample augmentation of one epoch (CPU tensors; identical on every process)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(num_samples, generator=generator)
    if not augment:
        return EpochPlan(order=order, boxes=None, flips=None)
    boxes = random_resized_crop_boxes(num_samples, side, side, scale=crop_scale, ratio=crop_ratio,
                                      generator=generator)
    flips = torch.rand(num_samples, generator=generator) < 0.5
    return EpochPlan(order=order, boxes=boxes, flips=flips)


def random_resized_crop_boxes(n: int, height: int, width: int, *, scale: Sequence[float],
                              ratio: Sequence[float], generator: torch.Generator,
                              attempts: int = 10) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for ``n`` samples at once: [n, 4] (x1, y1, x2, y2).

    Per sample: up to ``attempts`` draws of an area fraction in ``scale`` and a log-uniform aspect ratio
    in ``ratio``; the first that fits is placed uniformly at random; if none fits, the largest centred
    crop within ``ratio``. Integer pixel boxes, as torchvision's.
    """
    f64 = torch.float64
    area = float(height * width)
    low, high = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator, dtype=f64))
    aspect = torch.exp(low + (high - low) * torch.rand(n, attempts, generator=generator, dtype=f64))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # argmax returns the first of equal maxima
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # Fallback (no attempt fits): torchvision's centred crop of the whole image, clamped to ``ratio``.
    in_ratio = width / height
    fallback_w, fallback_h = float(width), float(height)
    if in_ratio < min(ratio):
        fallback_h = float(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w = float(round(height * max(ratio)))
    none_fit = ~fits.any(1)
    w = torch.where(none_fit, fallback_w, w)
    h = torch.where(none_fit, fallback_h, h)
    position = torch.rand(n, 2, generator=generator, dtype=f64)
    y = torch.floor(position[:, 0] * (height - h + 1))
    x = torch.floor(position[:, 1] * (width - w + 1))
    y = torch.where(none_fit, torch.floor((height - h) / 2), y)
    x = torch.where(none_fit, torch.floor((width - w) / 2), x)
    return torch.stack([x, y, x + w, y + h], 1).to(torch.float32)


def model_inputs(images: torch.Tensor, *, size: int, mean: Sequence[float] | torch.Tensor,
                 std: Sequence[float] | torch.Tensor,
                 boxes: torch.Tensor | None = None, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> normalised float32 ``[B, 3, size, size]``, cropped and flipped per sample
    when ``boxes`` / ``flips`` are given (rows aligned with ``images``), on ``images``' device."""
    x = images.float()
    if boxes is not None:
        batch_index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype).unsqueeze(1)
        rois = torch.cat([batch_index, boxes.to(x.device, x.dtype)], 1)
        # aligned=True: box edges are pixel edges, so an integer box of the output's size copies pixels.
        x = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    elif x.shape[-1] != size or x.shape[-2] != size:
        raise ValueError(f"images are {tuple(x.shape[-2:])}, expected {size}x{size} when not cropping")
    if flips is not None:
        x = torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    mean_t = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
    std_t = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
    return (x - mean_t) / std_t
