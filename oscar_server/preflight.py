"""Everything the server will need, checked before the first message is sent.

Without this, a run with a missing ImageNet checkpoint or a full disk fails at training, after every client
has uploaded and the GPU has spent its time on synthesis. :func:`preflight` lists every problem at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from oscar_common.config import OscarConfig
from oscar_common.models.loading import (
    ModelNotFoundError,
    NoVisionTowerError,
    check_clip_vision_config,
    check_diffusion_pipeline_files,
    text_embedding_dim,
)
from oscar_common.training.classifier import imagenet_weights_path

log = logging.getLogger("oscar.server")

# A 512x512 PNG of a photo-like synthetic image is ~0.4-0.5 MB; lossless, so plan for the upper end.
PNG_BYTES_PER_PIXEL = 2.0


class PreflightError(RuntimeError):
    """The server cannot run this configuration here; the message lists every reason and its fix."""


def preflight(cfg: OscarConfig, run_root: Path) -> None:
    problems: list[str] = []
    try:
        text_embedding_dim(cfg.scheme, cfg.client_encoder_id)
        if cfg.scheme == "pooled":
            text_embedding_dim("pooled", cfg.text_encoder)
        check_diffusion_pipeline_files(cfg.diffusion_model)
        if cfg.generated_per_class > cfg.images_per_class:  # the kept images are chosen with CLIP's vision tower
            check_clip_vision_config(cfg.text_encoder)
    except (ModelNotFoundError, NoVisionTowerError) as exc:
        problems.append(str(exc))
    except (OSError, ValueError) as exc:
        problems.append(f"a model could not be read: {exc}")
    if cfg.classifier_pretrained and not imagenet_weights_path().is_file():
        problems.append(
            f"classifier-pretrained=true needs the ImageNet ResNet-18 weights at {imagenet_weights_path()} "
            "(TORCH_HOME/hub/checkpoints); nothing is downloaded during a run. Fetch them once with "
            "`python -c \"import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')\"` on a machine "
            "with internet access and copy the file there, or set classifier-pretrained=false")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"device={cfg.device} but no CUDA GPU is visible (device=auto picks the CPU then)")
    problems += _run_dir_problems(cfg, run_root)
    if problems:
        raise PreflightError("the server cannot start this run:\n  - " + "\n  - ".join(problems))
    log.info("preflight passed: models, weights, disk space and the run directory are in place")


def synthetic_set_bytes(cfg: OscarConfig, clients: int) -> int:
    """Disk space the synthetic images of ``clients`` clients need (every class uploaded, every generated image)."""
    side = cfg.image_resolution or 512
    images = clients * len(cfg.class_names) * cfg.generated_per_class
    return int(images * side * side * PNG_BYTES_PER_PIXEL)


def _run_dir_problems(cfg: OscarConfig, run_root: Path) -> list[str]:
    try:
        run_root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_root, prefix=".preflight-"):
            pass
    except OSError as exc:
        return [f"the run directory {run_root} is not writable ({exc}): set run-dir to a writable folder"]
    needed = synthetic_set_bytes(cfg, cfg.min_clients)
    free = shutil.disk_usage(run_root).free
    if free < needed:
        return [f"{run_root} has {free / 1e9:.1f} GB free; the synthetic images of {cfg.min_clients} clients "
                f"need about {needed / 1e9:.1f} GB ({len(cfg.class_names)} classes x {cfg.generated_per_class} "
                "images each): free some space or point run-dir elsewhere"]
    if free < 2 * needed:
        log.warning("%s has %.1f GB free: enough for about %d clients' synthetic images", run_root, free / 1e9,
                    free // max(1, needed // cfg.min_clients))
    return []


def warn_if_flower_installed_dependencies() -> None:
    """Flower's SuperLink installs an app's dependencies per run (``uv sync``) unless told not to; for this
    project that is a fresh torch + CUDA download (gigabytes) that shadows the installed one. Say so loudly.

    Flower activates that environment by setting VIRTUAL_ENV to a folder under its home (FLWR_HOME)."""
    from flwr.supercore.utils import get_flwr_home

    venv = os.environ.get("VIRTUAL_ENV", "")
    if venv and Path(venv).resolve().is_relative_to(get_flwr_home().resolve()):
        log.warning("this ServerApp runs in an environment Flower installed for this run (%s): start the "
                    "SuperLink with --disable-runtime-dependency-installation, or export "
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 before the first `flwr run` (README)", venv)
