"""Train the ResNet-18 on decoded-once images at the device's pace, in one process or several.

The data is an :class:`~oscar_common.training.image_cache.ImageCache` (uint8 images on the training device). Each
step takes a batch of indices from the epoch's plan, crops/flips/normalises those images on the device
(:mod:`oscar_common.training.augmentation`) and runs SGD; on CUDA in bf16 autocast with channels_last tensors.

Several processes (``torchrun`` or ``accelerate launch``; the caller sets up the process group, e.g. with
``accelerate.PartialState``) share every global batch: the epoch's order and every sample's crop come from
(seed, epoch, sample index), each process takes a contiguous part of the batch, BatchNorm uses the
statistics of the whole batch (:mod:`oscar_common.training.sync_batchnorm`), the loss is scaled so that DDP's
gradient average is the gradient of the global batch's mean loss, and the epoch's loss and accuracy are
summed over processes. So 1 and N processes take the same steps (up to float rounding).

On CPU a run is deterministic given its seed, and a run resumed from its per-epoch checkpoint equals an
uninterrupted one. The weights kept at the end are those of the epoch with the best training accuracy
(every official recipe does this).
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from oscar_common.choices import TRAIN_PRECISIONS
from oscar_common.logs import progress
from oscar_common.training.augmentation import model_inputs, plan_epoch
from oscar_common.training.checkpoint import TrainingProgress, load_checkpoint, snapshot_checkpoint, write_checkpoint
from oscar_common.training.image_cache import ImageCache
from oscar_common.training.recipes import Recipe
from oscar_common.training.sync_batchnorm import synchronise_batchnorm

logger = logging.getLogger(__name__)


@dataclass
class TrainStats:
    epochs: int  # the recipe's epochs (all of them done when this returns)
    images: int  # training images per epoch
    seconds: float  # time in the training loop of this call
    epochs_run: int  # epochs run by this call (fewer than ``epochs`` after a resume)
    resumed_from_epoch: int  # epochs the checkpoint held when this call started
    best_epoch: int  # best training accuracy; its weights are the model's when the recipe keeps the best
    train_accuracy: float  # of the model's epoch (best or last), on the training images as augmented
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    accuracies: list[float] = field(default_factory=list)  # training accuracy per epoch
    lrs: list[float] = field(default_factory=list)  # lr per epoch
    processes: int = 1
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def images_per_second(self) -> float:
        """Training images per second of this call, all processes together."""
        return self.images * self.epochs_run / self.seconds if self.seconds > 0 else 0.0


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA GPUs that support it, else fp32. ``bf16`` asked for explicitly also
    runs on a CPU (autocast on the CPU: slower there, but the same code path as on a GPU, so it is tested)."""
    if name not in TRAIN_PRECISIONS:
        raise ValueError(f"train-precision must be one of {TRAIN_PRECISIONS}, got {name!r}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"train-precision=bf16 needs a GPU with bf16 support, and {device} has none; "
                         "use train-precision=fp32 (or auto)")
    return "bf16" if name == "bf16" or (name == "auto" and cuda_bf16) else "fp32"


def train_classifier(
    model: nn.Module,
    data: ImageCache,
    *,
    recipe: Recipe,
    image_size: int,
    seed: int,
    device: torch.device | str,
    precision: str,
    checkpoint: Path | None = None,
    log_every_epoch: bool = True,
) -> TrainStats:
    """Train ``model`` in place with ``recipe`` on ``data``; returns with the best epoch's weights loaded
    (``recipe.keep_best_epoch``) or the last epoch's.

    With ``checkpoint``, the state is saved there after every epoch (by the first process) and, if the
    file exists at the start, training continues after its last epoch.
    """
    device = torch.device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n, batch_size = len(data), recipe.batch_size
    if n < max(2, world):
        raise ValueError(f"need at least {max(2, world)} training images (BatchNorm, {world} process(es)), got {n}")
    if batch_size < max(2, world):
        raise ValueError(f"batch-size must be at least {max(2, world)} with {world} process(es), got {batch_size}")
    # A last batch too small for BatchNorm (one image) or for every process to get one is dropped.
    tail = n % batch_size
    used = n - tail if tail and tail < max(2, world) else n
    precision = resolve_precision(precision, device)
    cuda = device.type == "cuda"

    images, labels = data.images.to(device), data.labels.to(device)
    model.to(device).train()
    if world > 1:
        model = synchronise_batchnorm(model, device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    state = TrainingProgress()
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(Path(checkpoint), model, optimizer)
        if state.epoch > recipe.epochs:
            raise ValueError(f"{checkpoint} holds {state.epoch} epochs, more than the {recipe.epochs} asked for; "
                             "delete it to train afresh")
        if rank == 0:
            logger.info("resuming training from %s after epoch %d/%d", checkpoint, state.epoch, recipe.epochs)
    resumed_from = state.epoch
    net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16"
                else contextlib.nullcontext)
    mean, std = (torch.tensor(v, device=device) for v in (recipe.mean, recipe.std))  # copied once, not per step
    lrs = [recipe.lr_at(e) for e in range(1, state.epoch + 1)]

    started = time.perf_counter()
    # The checkpoint (~135 MB for ResNet-18) is written while the next epoch trains: on a GPU one epoch of a
    # DomainNet-scale set takes about as long as writing it. The step loop only queues device copies
    # (snapshot_checkpoint); host copies, serialising and writing happen in the writer thread. One write at a
    # time, all done before returning.
    writer, pending = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint"), None
    try:
        for epoch in range(state.epoch + 1, recipe.epochs + 1):
            lrs.append(recipe.lr_at(epoch))
            for group in optimizer.param_groups:
                group["lr"] = lrs[-1]
            plan = plan_epoch(seed=seed, epoch=epoch, num_samples=n, side=data.side, augment=recipe.augment,
                              crop_scale=recipe.crop_scale, crop_ratio=recipe.crop_ratio)
            order = plan.order[:used].to(device)
            boxes = plan.boxes.to(device) if plan.boxes is not None else None
            flips = plan.flips.to(device) if plan.flips is not None else None
            starts = range(0, used, batch_size)
            if rank == 0:
                starts = progress(starts, desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", leave=False,
                                  logger=logger)
            loss_total, correct, seen = _one_epoch(
                net, optimizer, images, labels, order, boxes, flips, starts, batch_size=batch_size,
                image_size=image_size, mean=mean, std=std, autocast=autocast, channels_last=cuda)
            state.epoch = epoch
            state.losses.append(loss_total / seen)
            state.accuracies.append(correct / seen)
            if state.accuracies[-1] > state.best_accuracy:
                state.best_epoch = epoch
                if recipe.keep_best_epoch:
                    # A copy on the device: a host copy here would wait for the GPU every time accuracy improves.
                    state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if log_every_epoch and rank == 0:
                logger.info("epoch %d/%d lr %.3g loss %.4f acc %.4f", epoch, recipe.epochs, lrs[-1], state.losses[-1],
                            state.accuracies[-1])
            if checkpoint is not None and rank == 0:
                if pending is not None:
                    pending.result()  # the previous epoch's file is complete (and its errors raised)
                pending = writer.submit(write_checkpoint, Path(checkpoint), snapshot_checkpoint(model, optimizer, state))
        if pending is not None:
            pending.result()
    finally:
        writer.shutdown(wait=True)  # also when interrupted: the last submitted epoch reaches the disk
    seconds = time.perf_counter() - started

    if recipe.keep_best_epoch and state.best_state:
        model.load_state_dict(state.best_state)
    return TrainStats(
        epochs=recipe.epochs, images=used, seconds=seconds, epochs_run=recipe.epochs - resumed_from,
        resumed_from_epoch=resumed_from, best_epoch=state.best_epoch,
        train_accuracy=state.best_accuracy if recipe.keep_best_epoch else state.accuracies[-1],
        losses=list(state.losses), accuracies=list(state.accuracies), lrs=lrs, processes=world, device=str(device),
        precision=precision)


def _one_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               order: torch.Tensor, boxes: torch.Tensor | None, flips: torch.Tensor | None, starts: Iterable[int], *,
               batch_size: int, image_size: int, mean: torch.Tensor, std: torch.Tensor,
               autocast: Callable[[], contextlib.AbstractContextManager], channels_last: bool) -> tuple[float, float, float]:
    """SGD over the global batches ``order[start:start + batch_size]``; this process takes its contiguous
    part of each. Returns (loss sum, correct, images) over all processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(2, dtype=torch.float64, device=images.device)  # loss sum, correct: no per-step sync
    seen = 0
    for start in starts:
        global_batch = order[start:start + batch_size]
        index = torch.tensor_split(global_batch, world)[rank]
        x = model_inputs(images[index], size=image_size, mean=mean, std=std,
                         boxes=None if boxes is None else boxes[index], flips=None if flips is None else flips[index])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[index]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = net(x)
        loss_sum = criterion(logits.float(), y)
        # DDP averages gradients over processes: scale so the average is that of the global mean loss.
        (loss_sum * (world / global_batch.numel())).backward()
        optimizer.step()
        with torch.no_grad():
            totals += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double()])
        seen += y.numel()
    totals = torch.cat([totals, torch.tensor([float(seen)], dtype=torch.float64, device=images.device)])
    if world > 1:
        dist.all_reduce(totals)
    loss_total, correct, seen_all = totals.tolist()
    return loss_total, correct, seen_all
