"""The training stage: a run directory's synthetic images -> its ResNet-18 (``model.safetensors``).

Run by the server after synthesis, or by hand (after a crash, or with other settings)::

    oscar-train RUN_DIR [--fresh] [--set key=value ...]
    python -m oscar_server.stages.train RUN_DIR ...
    accelerate launch --multi_gpu --num_processes 4 -m oscar_server.stages.train RUN_DIR

It reads the run directory only: ``config.json`` (overridden by ``--set``), the accepted uploads
(``uploads.json``), the synthetic images ``synthetic/<class>/<client>__c<id>__<index>.png`` of those uploads
(the first ``images-per-class`` of each client and class) and, if present, ``checkpoint.safetensors``.
It writes the per-epoch checkpoint, ``model.safetensors`` and ``stages/training-summary.json``.

Resume safety: the settings that shape the model (recipe, image size, pretrained backbone, seed, classes,
the list of training images) are recorded in ``stages/training.json``; a checkpoint or model made with
other settings is never reused (the stage stops and says what changed). ``--fresh`` removes the
checkpoint, the model, the summary and that record. A finished model with the same settings is reused
at once.

Under ``accelerate launch`` or ``torchrun`` (``num-processes``; :mod:`oscar_server.stages.launcher`) every
process trains on its part of each global batch (:mod:`oscar_common.training.loop`): 1 and N processes train
the same model, up to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch.distributed as dist
from accelerate import PartialState
from safetensors import safe_open

from oscar_common.config import OscarConfig
from oscar_common.devices import peak_memory_gb, reset_peak_memory, resolve_device
from oscar_common.files import atomic_write_bytes, atomic_write_json, safe_filename
from oscar_common.training.classifier import ARCHITECTURE, classifier_to_bytes
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.cli import on_first_process, run_stage_command
from oscar_server.stages.fingerprint import (
    StageSettingsChanged,
    check_stage_settings,
    forget_stage,
    stage_settings_path,
    stage_summary_path,
)
from oscar_server.stages.fitting import decode_training_images, fit_classifier, new_classifier, training_recipe
from oscar_server.stages.summary import StageSummary
from oscar_server.stages.synthesis_jobs import synthetic_images

log = logging.getLogger("oscar.train")

STAGE = "training"
FRESH_HINT = "oscar-train RUN_DIR --fresh"
# Processes wait for each other at collectives: while the first one writes a checkpoint or the model, or
# decodes a larger share. NCCL's default 10 minutes is tight for a slow disk; nothing here waits longer.
TIMEOUT = timedelta(minutes=30)
SUMMARY_METADATA = "oscar.training-summary"  # model.safetensors carries its summary (the launcher
# deletes stages/training-summary.json before each run; a reused model writes it again from there)


class SyntheticSetIncomplete(RuntimeError):
    """Synthesis has not written every image the accepted uploads call for."""


# Errors that say what to do (said without a traceback by the command, and passed on to every process)
PLAIN_ERRORS = (StageSettingsChanged, SyntheticSetIncomplete, FileNotFoundError, ValueError)


@dataclass
class TrainingSummary(StageSummary):
    """``<run dir>/stages/training-summary.json``: what was trained, on what, how fast, where."""

    status: str  # "trained", or "reused" (a finished model with the same settings was found)
    model: str  # path of model.safetensors
    recipe: dict[str, Any]  # the resolved recipe (oscar_common.training.recipes.Recipe), overrides applied
    image_size: int
    cache_size: int  # side of the decoded-once training images
    classes: int
    images: int  # training images listed
    trained_images: int  # used per epoch: listed - unreadable (- a last batch of one, if any)
    unreadable_images: int
    unreadable: list[str]  # their paths, relative to the run dir
    epochs: int
    epochs_run: int  # by the invocation that finished the model (fewer after a resume)
    resumed_from_epoch: int
    best_epoch: int  # the epoch whose weights were kept (best training accuracy)
    train_accuracy: float  # of that epoch
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0  # the whole stage (decode + train + write)
    decode_seconds: float = 0.0
    train_seconds: float = 0.0
    images_per_second: float = 0.0  # training images per second in the training loop, all processes
    processes: int = 1
    devices: list[str] = field(default_factory=list)
    precision: str = "fp32"
    peak_memory_gb: float | None = None  # GPU memory peak of the first process (image cache included); None off CUDA

    stage: str = STAGE


def summary_path(run_dir: RunDirectory) -> Path:
    return stage_summary_path(run_dir.root, STAGE)


# ------------------------------------------------------------------------------------------ stage
def train_run(run_dir: RunDirectory | Path, cfg: OscarConfig, *, fresh: bool = False) -> TrainingSummary:
    """Train (or resume, or reuse) the run's classifier; the same call in every process of a launch."""
    started = time.perf_counter()
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory(Path(run_dir).expanduser().resolve())
    # 1. Processes and devices: one per GPU under a launcher, else the configured device.
    device = resolve_device(cfg.device)
    state = PartialState(cpu=device.type == "cpu", timeout=TIMEOUT)
    if state.num_processes > 1:
        device = state.device  # this process's GPU (or CPU share)
    recipe = training_recipe(cfg)

    # 2. The training images; then, once, resume safety and whether a finished model can be reused.
    items = training_images(run, cfg)
    settings = {
        "architecture": ARCHITECTURE, "recipe": recipe.settings(), "classifier-image-size": cfg.classifier_image_size,
        "classifier-pretrained": cfg.classifier_pretrained, "seed": cfg.seed, "class-names": list(cfg.class_names),
        "training-images": {"count": len(items), "sha256": _digest(p for p, _ in items)},
    }
    reuse = on_first_process(state, lambda: _prepare_outputs(run, settings, fresh=fresh), errors=PLAIN_ERRORS)
    if reuse is not None:
        if state.is_main_process:
            log.info("training: reusing %s, trained with the same settings (%s retrains)", run.model_path, FRESH_HINT)
        return reuse

    # 3. Every image decoded once into a uint8 cache on the training device.
    reset_peak_memory(device)
    cache_side = recipe.cache_size(cfg.classifier_image_size)
    if state.is_main_process:
        log.info("training ResNet-18 (%s recipe: %d epochs, batch %d, lr %g) on %d synthetic images of %d "
                 "classes, %d process(es) on %s", recipe.name, recipe.epochs, recipe.batch_size, recipe.lr,
                 len(items), len(cfg.class_names), state.num_processes, device)
    data = decode_training_images([(run.root / p, label) for p, label in items], cfg, recipe, device,
                                  processes=state.num_processes, names=[p for p, _ in items])

    # 4. Train, from the checkpoint if there is one; the model ends with the best epoch's weights.
    model = new_classifier(cfg)
    stats = fit_classifier(model, data, cfg, recipe, device, checkpoint=run.checkpoint_path)

    # 5. The first process writes the model (its summary inside), then the summary file.
    devices = _all_devices(state, str(device))
    summary = TrainingSummary(
        status="trained", model=str(run.model_path), recipe=recipe.settings(), image_size=cfg.classifier_image_size,
        cache_size=cache_side, classes=len(cfg.class_names), images=len(items), trained_images=stats.images,
        unreadable_images=len(data.unreadable), unreadable=data.unreadable, epochs=stats.epochs,
        epochs_run=stats.epochs_run, resumed_from_epoch=stats.resumed_from_epoch, best_epoch=stats.best_epoch,
        train_accuracy=stats.train_accuracy, losses=stats.losses, accuracies=stats.accuracies, lrs=stats.lrs,
        seconds=round(time.perf_counter() - started, 3), decode_seconds=round(data.seconds, 3),
        train_seconds=round(stats.seconds, 3), images_per_second=round(stats.images_per_second, 1),
        processes=stats.processes, devices=devices, precision=stats.precision, peak_memory_gb=peak_memory_gb(device),
    )
    if state.is_main_process:
        metadata = {"recipe": recipe.name, SUMMARY_METADATA: json.dumps(summary.to_dict())}
        atomic_write_bytes(run.model_path, classifier_to_bytes(model.cpu(), metadata, class_names=cfg.class_names))
        atomic_write_json(summary_path(run), summary.to_dict())
        log.info("training done: best epoch %d/%d, train accuracy %.4f, %.0f img/s on %s; model in %s",
                 stats.best_epoch, stats.epochs, stats.train_accuracy, stats.images_per_second, ", ".join(devices),
                 run.model_path)
    state.wait_for_everyone()
    return summary


def training_images(run: RunDirectory, cfg: OscarConfig) -> list[tuple[str, int]]:
    """(path relative to the run dir, class id) of the training images, in (client, class, index) order:
    the first ``images-per-class`` images in ``synthetic/`` of every client and class of the accepted uploads
    (the synthesis stage leaves there the ones it keeps: with ``generate-per-class``, those of highest
    fidelity, whatever their index).

    Raises :class:`SyntheticSetIncomplete` when a client and class has fewer: training on a half-made
    synthetic set would be silently wrong.
    """
    folders = [safe_filename(name) for name in cfg.class_names]
    wanted = {(safe_filename(upload.client_name), class_id): upload.client_name
              for upload in run.accepted_uploads() for class_id in upload.classes}
    found: dict[tuple[str, int], list[Path]] = {key: [] for key in wanted}
    for image in synthetic_images(run.synthetic_dir):  # sorted by (client, class id, index)
        key = (image.client, image.class_id)
        in_its_folder = image.path.parent.name == folders[image.class_id]
        if key in found and len(found[key]) < cfg.images_per_class and in_its_folder:
            found[key].append(image.path)
    short = [f"{wanted[key]}/{cfg.class_names[key[1]]}: {len(paths)}" for key, paths in found.items()
             if len(paths) < cfg.images_per_class]
    if short:
        raise SyntheticSetIncomplete(
            f"the synthetic set in {run.synthetic_dir} is incomplete: {len(short)} (client, class) pair(s) have "
            f"fewer than images-per-class={cfg.images_per_class} images ({', '.join(short[:5])}"
            f"{' ...' if len(short) > 5 else ''}). Run the synthesis stage first: oscar-synthesize {run.root}")
    return [(path.relative_to(run.root).as_posix(), class_id)
            for (_, class_id), paths in sorted(found.items()) for path in paths]


def discard_training(run: RunDirectory) -> None:
    """``--fresh``: remove the checkpoint, the model, the summary and the settings record."""
    for path in (run.checkpoint_path, run.model_path, summary_path(run)):
        path.unlink(missing_ok=True)
    forget_stage(run.root, STAGE)
    log.info("discarded the training outputs in %s", run.root)


def _prepare_outputs(run: RunDirectory, settings: dict[str, Any], *, fresh: bool) -> TrainingSummary | None:
    """--fresh; refuse outputs of other or unknown settings; the summary of a finished model to reuse."""
    if fresh:
        discard_training(run)
    outputs = [p for p in (run.checkpoint_path, run.model_path) if p.exists()]
    if outputs and not stage_settings_path(run.root, STAGE).exists():
        raise StageSettingsChanged(
            f"{run.root} holds training outputs ({', '.join(p.name for p in outputs)}) but no record of the "
            f"settings that made them, so they cannot be reused safely; start afresh: {FRESH_HINT}")
    check_stage_settings(run.root, STAGE, settings, fresh_hint=FRESH_HINT)
    if not run.model_path.exists():
        return None
    with safe_open(str(run.model_path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get(SUMMARY_METADATA)
    if recorded is None:
        return None  # a model without its summary: train again (from the checkpoint, so quickly)
    summary = TrainingSummary.from_dict({**json.loads(recorded), "status": "reused"})
    atomic_write_json(summary_path(run), summary.to_dict())
    return summary


# -------------------------------------------------------------------------------- processes
def _all_devices(state: PartialState, device: str) -> list[str]:
    if state.num_processes == 1:
        return [device]
    devices: list[str | None] = [None] * state.num_processes
    dist.all_gather_object(devices, device)
    return [str(d) for d in devices]


def _digest(paths: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    run_stage_command(argv, prog="oscar-train", description="OSCAR's training stage: synthetic images -> "
                      "ResNet-18 (model.safetensors), resumable, on one or (under accelerate launch) several GPUs",
                      run=train_run, plain_errors=PLAIN_ERRORS)


if __name__ == "__main__":
    main()
