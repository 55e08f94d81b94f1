"""How the training stage turns labelled images into the classifier, with the run config's values: the
recipe, every image decoded once into a cache on the training device, the classifier, the training loop.

The training stage (:mod:`oscar_server.stages.train`) calls these on a run directory's synthetic images;
oscar-bench calls the same on its own PNGs, so it measures the stage's code. This module knows nothing of
run directories (the benchmark's machine has no Flower, which the run directory's upload records need).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from oscar_common.config import OscarConfig
from oscar_common.training.classifier import build_classifier
from oscar_common.training.image_cache import ImageCache, decode_images, decode_workers
from oscar_common.training.loop import TrainStats, train_classifier
from oscar_common.training.recipes import Recipe, resolve_recipe


def training_recipe(cfg: OscarConfig) -> Recipe:
    """``train-recipe`` with the run's ``epochs``, ``lr`` and ``batch-size`` overrides applied."""
    return resolve_recipe(cfg.train_recipe, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)


def training_decode_workers(cfg: OscarConfig, images: int, processes: int = 1) -> int:
    """Worker processes that decode ``images`` for one of ``processes`` training processes (``decode-workers``)."""
    return decode_workers(cfg.decode_workers, images, processes)


def decode_training_images(items: Sequence[tuple[Path, int]], cfg: OscarConfig, recipe: Recipe,
                           device: torch.device, *, processes: int = 1,
                           names: Sequence[str] | None = None) -> ImageCache:
    """Every (path, class id) of ``items`` decoded once, at the recipe's cache size for
    ``classifier-image-size``, onto ``device``; ``names`` name the images in logs (default: their paths)."""
    return decode_images([path for path, _ in items], [label for _, label in items],
                         side=recipe.cache_size(cfg.classifier_image_size), device=device,
                         num_workers=training_decode_workers(cfg, len(items), processes), names=names)


def new_classifier(cfg: OscarConfig) -> nn.Module:
    """The run's classifier before training: one output per class, ImageNet weights if
    ``classifier-pretrained``, the head initialised from ``seed``."""
    return build_classifier(len(cfg.class_names), pretrained=cfg.classifier_pretrained, seed=cfg.seed)


def fit_classifier(model: nn.Module, data: ImageCache, cfg: OscarConfig, recipe: Recipe, device: torch.device, *,
                   checkpoint: Path | None = None, log_every_epoch: bool = True) -> TrainStats:
    """Train ``model`` in place on ``data`` with ``recipe``, at ``classifier-image-size`` and in
    ``train-precision``; with ``checkpoint``, saved after every epoch and resumed from if it exists."""
    return train_classifier(model, data, recipe=recipe, image_size=cfg.classifier_image_size, seed=cfg.seed,
                            device=device, precision=cfg.train_precision, checkpoint=checkpoint,
                            log_every_epoch=log_every_epoch)
