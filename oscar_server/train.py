"""The training stage: a run directory's synthetic images -> its ResNet-18 (``model.safetensors``).

Run by the server after synthesis, or by hand (after a crash, or with other settings)::

    oscar-train RUN_DIR [--fresh] [--set key=value ...]       # one process
    torchrun --nproc_per_node 8 -m oscar_server.train RUN_DIR   # or: accelerate launch -m oscar_server.train

It reads the run directory only: ``config.json`` (overridden by ``--set``), the accepted uploads
(``uploads.json``), the synthetic images ``synthetic/<class>/<client>__c<id>__<index>.png`` of those uploads
(the first ``images-per-class`` of each client and class) and, if present, ``checkpoint.safetensors``.
It writes the per-epoch checkpoint, ``model.safetensors`` and ``stages/training-summary.json``.

Resume safety: the settings that shape the model (recipe, image size, pretrained backbone, seed, classes,
the list of training images) are recorded in ``stages/training.json``; a checkpoint or model made with
other settings is never reused (the stage stops and says what changed). ``--fresh`` removes the
checkpoint, the model, the summary and that record. A finished model with the same settings is reused
at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch.distributed as dist

from oscar_common.classifier import ARCHITECTURE, build_classifier, classifier_to_bytes
from oscar_common.config import OscarConfig
from oscar_common.devices import resolve_device
from oscar_common.files import atomic_write_bytes, atomic_write_json, safe_filename
from oscar_common.image_cache import decode_images
from oscar_common.logs import setup_logging
from oscar_common.recipes import resolve_recipe
from oscar_common.training import train_classifier
from oscar_server.fingerprint import StageSettingsChanged, check_stage_settings, forget_stage, stage_settings_path
from oscar_server.run_dir import RunDirectory

log = logging.getLogger("oscar.train")

STAGE = "training"
T = TypeVar("T")


class SyntheticSetIncomplete(RuntimeError):
    """Synthesis has not written every image the accepted uploads call for."""


@dataclass
class TrainingSummary:
    """``<run dir>/stages/training-summary.json``: what was trained, on what, how fast, where."""

    status: str  # "trained", or "reused" (a finished model with the same settings was found)
    model: str  # path of model.safetensors
    recipe: dict[str, Any]  # the resolved recipe (oscar_common.recipes.Recipe), overrides applied
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

    @classmethod
    def load(cls, path: Path) -> "TrainingSummary":
        return cls(**json.loads(Path(path).read_text()))


def summary_path(run_root: Path) -> Path:
    return Path(run_root) / "stages" / "training-summary.json"


# ------------------------------------------------------------------------------------------ stage
def train_run(run_dir: Path, cfg: OscarConfig, *, fresh: bool = False) -> TrainingSummary:
    """Train (or resume, or reuse) the run's classifier; the same call in every process of a launch."""
    started = time.perf_counter()
    run = RunDirectory(Path(run_dir).resolve())
    state = _process_state(cfg)
    device = state.device if state.num_processes > 1 else resolve_device(cfg.device)
    recipe = resolve_recipe(cfg.train_recipe, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size)
    fresh_hint = f"oscar-train {run.root} --fresh"

    # 1. List the training images and decide, on the first process, whether anything can be reused.
    items = training_images(run, cfg)
    settings = {
        "architecture": ARCHITECTURE, "recipe": recipe.settings(), "classifier-image-size": cfg.classifier_image_size,
        "classifier-pretrained": cfg.classifier_pretrained, "seed": cfg.seed, "class-names": list(cfg.class_names),
        "training-images": {"count": len(items), "sha256": _digest(p for p, _ in items)},
    }
    reuse = _on_first_process(state, lambda: _prepare_outputs(run, settings, fresh=fresh, fresh_hint=fresh_hint))
    if reuse is not None:
        log.info("training: reusing %s (trained with the same settings; %s to retrain)", run.model_path, fresh_hint)
        return reuse

    # 2. Decode every image once into a uint8 cache on the training device.
    cache_side = recipe.cache_size(cfg.classifier_image_size)
    if state.is_main_process:
        log.info("training ResNet-18 (%s recipe: %d epochs, batch %d, lr %g) on %d synthetic images of %d "
                 "classes, %d process(es) on %s", recipe.name, recipe.epochs, recipe.batch_size, recipe.lr,
                 len(items), len(cfg.class_names), state.num_processes, device)
    data = decode_images([run.root / p for p, _ in items], [label for _, label in items], side=cache_side,
                         device=device, num_workers=_decode_workers(cfg.decode_workers, len(items), state.num_processes),
                         names=[p for p, _ in items])

    # 3. Train from the checkpoint if there is one, and keep the best epoch's weights.
    model = build_classifier(len(cfg.class_names), pretrained=cfg.classifier_pretrained, seed=cfg.seed)
    stats = train_classifier(model, data, recipe=recipe, image_size=cfg.classifier_image_size, seed=cfg.seed,
                             device=device, precision=cfg.train_precision, checkpoint=run.checkpoint_path)

    # 4. The first process writes the model, then the summary (its presence marks the stage finished).
    devices = _all_devices(state, str(device))
    summary = TrainingSummary(
        status="trained", model=str(run.model_path), recipe=recipe.settings(), image_size=cfg.classifier_image_size,
        cache_size=cache_side, classes=len(cfg.class_names), images=len(items), trained_images=stats.images,
        unreadable_images=len(data.unreadable), unreadable=data.unreadable, epochs=stats.epochs,
        epochs_run=stats.epochs_run, resumed_from_epoch=stats.resumed_from_epoch, best_epoch=stats.best_epoch,
        train_accuracy=stats.train_accuracy, losses=stats.losses, accuracies=stats.accuracies, lrs=stats.lrs,
        decode_seconds=round(data.seconds, 3), train_seconds=round(stats.seconds, 3),
        images_per_second=round(stats.images_per_second, 1), processes=stats.processes, devices=devices,
        precision=stats.precision,
    )
    summary.seconds = round(time.perf_counter() - started, 3)
    if state.is_main_process:
        metadata = {"recipe": recipe.name, "best-epoch": str(stats.best_epoch),
                    "train-accuracy": f"{stats.train_accuracy:.6f}"}
        atomic_write_bytes(run.model_path, classifier_to_bytes(model.cpu(), metadata, class_names=cfg.class_names))
        atomic_write_json(summary_path(run.root), asdict(summary))
        log.info("training: best epoch %d/%d, train accuracy %.4f, %.0f img/s; model in %s", stats.best_epoch,
                 stats.epochs, stats.train_accuracy, stats.images_per_second, run.model_path)
    if state.num_processes > 1:
        dist.barrier()
    return summary


def training_images(run: RunDirectory, cfg: OscarConfig) -> list[tuple[str, int]]:
    """(path relative to the run dir, class id) of every training image, by client then class then index.

    Raises :class:`SyntheticSetIncomplete` when a client and class of the accepted uploads has fewer
    than ``images-per-class`` images: training on a half-synthesised set would be silently wrong.
    """
    folders = [safe_filename(name) for name in cfg.class_names]
    if len(set(folders)) != len(folders):
        raise ValueError(f"class names {list(cfg.class_names)} share a folder name once made file-safe")
    items: list[tuple[str, int]] = []
    short: list[str] = []
    for payload in run.accepted_uploads():  # sorted by client name
        for class_id in payload.class_ids.tolist():
            folder = run.synthetic_dir / folders[class_id]
            pattern = f"{safe_filename(payload.client_name)}__c{class_id:04d}__*.png"
            files = sorted(folder.glob(pattern))[:cfg.images_per_class]
            if len(files) < cfg.images_per_class:
                short.append(f"{payload.client_name}/{cfg.class_names[class_id]}: {len(files)}")
            items += [(f.relative_to(run.root).as_posix(), class_id) for f in files]
    if short:
        raise SyntheticSetIncomplete(
            f"the synthetic set in {run.synthetic_dir} is incomplete: {len(short)} (client, class) pair(s) have "
            f"fewer than images-per-class={cfg.images_per_class} images ({', '.join(short[:5])}"
            f"{' ...' if len(short) > 5 else ''}). Run the synthesis stage first: oscar-synthesize {run.root}")
    return items


def _prepare_outputs(run: RunDirectory, settings: dict[str, Any], *, fresh: bool,
                     fresh_hint: str) -> TrainingSummary | None:
    """--fresh; refuse outputs of other or unknown settings; the finished summary if it can be reused."""
    outputs = (run.checkpoint_path, run.model_path, summary_path(run.root))
    if fresh:
        for path in outputs:
            path.unlink(missing_ok=True)
        forget_stage(run.root, STAGE)
        log.info("training: --fresh: removed the checkpoint, model and settings record of %s", run.root)
    if not stage_settings_path(run.root, STAGE).exists() and any(p.exists() for p in outputs):
        found = ", ".join(p.name for p in outputs if p.exists())
        raise StageSettingsChanged(f"{run.root} holds training outputs ({found}) but no record of the settings "
                                   f"that made them, so they cannot be reused safely; start afresh: {fresh_hint}")
    check_stage_settings(run.root, STAGE, settings, fresh_hint=fresh_hint)
    if run.model_path.exists() and summary_path(run.root).exists():
        summary = TrainingSummary.load(summary_path(run.root))
        summary.status = "reused"
        atomic_write_json(summary_path(run.root), asdict(summary))
        return summary
    return None


# -------------------------------------------------------------------------------- processes
def _process_state(cfg: OscarConfig):
    """accelerate's view of this process (one, or one of a torchrun / accelerate launch group)."""
    from accelerate import PartialState

    cpu = resolve_device(cfg.device).type == "cpu"
    return PartialState(cpu=cpu)


def _on_first_process(state, work: Callable[[], T]) -> T:
    """Run ``work`` on the first process only and give every process its result (or its error)."""
    if state.num_processes == 1:
        return work()
    outcome: list[Any] = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = work()
        except Exception as exc:  # every process must learn of it, or the others wait forever
            outcome[1] = (type(exc).__name__, str(exc))
            raise
        finally:
            dist.broadcast_object_list(outcome, src=0)
    else:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        kind, message = outcome[1]
        known = {e.__name__: e for e in (StageSettingsChanged, SyntheticSetIncomplete, FileNotFoundError, ValueError)}
        raise known.get(kind, RuntimeError)(message)
    return outcome[0]


def _all_devices(state, device: str) -> list[str]:
    if state.num_processes == 1:
        return [device]
    devices: list[str | None] = [None] * state.num_processes
    dist.all_gather_object(devices, device)
    return [str(d) for d in devices]


def _decode_workers(setting: int, images: int, processes: int) -> int:
    """-1: none for a few images (starting workers costs more), else the CPUs this process may use."""
    if setting >= 0:
        return setting
    if images < 64:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // processes - 1))


def _digest(paths: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- CLI
def load_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> OscarConfig:
    """``<run dir>/config.json`` with ``key=value`` overrides (run-config spelling, e.g. ``epochs=5``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not an OSCAR run directory")
    values = json.loads(path.read_text())
    known = OscarConfig().to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        if key not in known:
            raise ValueError(f"--set {key}: not a run-config key (known: {', '.join(sorted(known))})")
        values[key] = value
    return OscarConfig.from_run_config(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oscar-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (holds config.json and synthetic/)")
    parser.add_argument("--fresh", action="store_true",
                        help="remove the checkpoint, model and settings record first, and train from the start")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key for this training (repeatable), e.g. --set epochs=5")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_run_config(args.run_dir, args.overrides)
        train_run(args.run_dir, cfg, fresh=args.fresh)
    except (StageSettingsChanged, SyntheticSetIncomplete, FileNotFoundError, ValueError) as exc:
        print(f"oscar-train: error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # one line per launch, not per process
        print(summary_path(Path(args.run_dir).resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
