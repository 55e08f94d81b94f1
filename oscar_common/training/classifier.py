"""The ResNet-18 that the server trains on the synthetic set and every client evaluates.

A torchvision ResNet-18 (ImageNet weights by default) trained with cross-entropy by a named recipe
(:mod:`oscar_common.training.recipes`). The default, ``official``, is the official OSCAR code's train.py: SGD lr
5e-4, momentum 0.9, 20 epochs, batch 256, images resized to 224 without crops or flips, a constant lr, and
the best training-accuracy epoch kept; ``official-openimage`` adds its OpenImage loader's batch 32 and
random crops and flips. Weights travel and rest as safetensors only; :func:`classifier_from_bytes` checks
a blob's header against the expected architecture before any tensor is loaded, and nothing is ever
unpickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import models
from torchvision.transforms import v2

from oscar_common.data.local import collate_readable
from oscar_common.files import atomic_write_bytes
from oscar_common.logs import progress
from oscar_common.training.recipes import eval_preprocessing

logger = logging.getLogger(__name__)

ARCHITECTURE = "resnet18"
_DOWNLOAD_TIMEOUT_S = 60.0


class ClassifierFormatError(ValueError):
    """A classifier blob is not a valid ResNet-18 safetensors file for the expected classes."""


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights are neither in the torch hub cache nor downloadable."""


# ---------------------------------------------------------------------------------------- model
def build_classifier(num_classes: int, pretrained: bool = False, seed: int | None = None) -> nn.Module:
    """torchvision ResNet-18 with a ``num_classes``-way head (ImageNet backbone when ``pretrained``).

    ``seed`` makes the freshly initialised layers reproducible without touching the global RNG.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    # fork_rng only when seeded: unseeded builds must keep advancing the global RNG (distinct inits).
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        if not pretrained:
            return models.resnet18(weights=None, num_classes=num_classes)
        model = _imagenet_resnet18()
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model


def imagenet_weights_path() -> Path:
    """Where torchvision keeps the ImageNet ResNet-18 checkpoint ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(models.ResNet18_Weights.IMAGENET1K_V1.url)


def _imagenet_resnet18() -> nn.Module:
    weights = models.ResNet18_Weights.IMAGENET1K_V1
    cached = imagenet_weights_path()
    # torch.hub's download has no timeout of its own; bound it so a blocked network fails, not hangs.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        return models.resnet18(weights=weights)
    except OSError as exc:  # URLError, timeouts, DNS failures
        raise PretrainedWeightsUnavailable(
            f"ImageNet ResNet-18 weights {cached.name} are not in the torch hub cache ({cached}) and "
            f"could not be downloaded from {weights.url}: {exc}. Pre-fetch them on a machine with "
            f"internet access (python -c 'import torchvision; torchvision.models.resnet18(weights="
            f"\"IMAGENET1K_V1\")') and copy the file to $TORCH_HOME/hub/checkpoints/ (TORCH_HOME is "
            f"{os.environ.get('TORCH_HOME', 'unset: default ~/.cache/torch')}), or set "
            "classifier-pretrained=false to train from scratch."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


# ----------------------------------------------------------------------------------- transforms
def eval_transform(image_size: int, recipe: str) -> v2.Compose:
    """How a client prepares test images for a model trained with ``recipe`` (see
    :func:`oscar_common.training.recipes.eval_preprocessing`; clients get the same values as plain config)."""
    return eval_preprocessing(image_size, recipe).transform()


# ------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalResult:
    accuracy: float
    per_class_accuracy: dict[int, float]  # only classes present in the data set
    n: int
    unreadable: int = 0  # test images that could not be decoded (left out of n)


@torch.inference_mode()
def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
) -> EvalResult:
    """Top-1 accuracy overall and per class (for the classes present).

    Images the data set cannot decode (``ImageListDataset(skip_unreadable=True)``) are left out and
    counted in ``EvalResult.unreadable``.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    unreadable = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_readable)
    for inputs, labels, skipped in progress(loader, desc="evaluate", leave=False, unit="batch", logger=logger):
        unreadable += skipped
        if labels.numel() == 0:
            continue
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
        predictions = model(inputs.to(device)).argmax(1).cpu()
        total += torch.bincount(labels, minlength=num_classes)
        correct += torch.bincount(labels[predictions == labels], minlength=num_classes)
    model.train(was_training)
    n = int(total.sum())
    if n == 0:
        raise ValueError(f"none of the {len(dataset)} test images could be read")
    if unreadable:
        logger.warning("evaluation skipped %d unreadable image(s) of %d", unreadable, len(dataset))
    per_class = {c: correct[c].item() / total[c].item() for c in range(num_classes) if total[c] > 0}
    return EvalResult(accuracy=correct.sum().item() / n, per_class_accuracy=per_class, n=n, unreadable=unreadable)


# ----------------------------------------------------------------------------- safetensors I/O
def classifier_to_bytes(
    model: nn.Module,
    metadata: Mapping[str, str] | None = None,
    *,
    class_names: Sequence[str],
) -> bytes:
    """Serialise the state dict as safetensors with ``architecture``, ``num_classes`` and ``class_names``
    (a JSON list) added to ``metadata``."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["architecture"] = ARCHITECTURE
    meta["num_classes"] = str(model.fc.out_features)
    if len(class_names) != model.fc.out_features:
        raise ValueError(f"{len(class_names)} class names for {model.fc.out_features} outputs")
    meta["class_names"] = json.dumps(list(class_names))
    return safetensors.torch.save(state, metadata=meta)


def save_classifier(
    model: nn.Module,
    path: Path,
    metadata: Mapping[str, str] | None = None,
    *,
    class_names: Sequence[str],
) -> None:
    """Write :func:`classifier_to_bytes` to ``path`` atomically (temp file + rename)."""
    atomic_write_bytes(Path(path), classifier_to_bytes(model, metadata, class_names=class_names))


def read_classifier_header(blob: bytes) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, tensor name -> shape) from a safetensors header, without touching tensor data.

    The safetensors library exposes metadata only for files, so the (documented) header is read here:
    an 8-byte little-endian length, then that many bytes of JSON.
    """
    if len(blob) < 8:
        raise ClassifierFormatError(f"not a safetensors file: only {len(blob)} bytes")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > len(blob) - 8:
        raise ClassifierFormatError(
            f"not a safetensors file: header length {length} exceeds the {len(blob)}-byte blob"
        )
    try:
        header = json.loads(blob[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ClassifierFormatError("not a safetensors file: header is not JSON") from None
    if not isinstance(header, dict):
        raise ClassifierFormatError("not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ClassifierFormatError("not a safetensors file: __metadata__ is not a JSON object")
    try:
        shapes = {name: [int(d) for d in spec["shape"]] for name, spec in header.items()}
    except (TypeError, KeyError, ValueError):
        raise ClassifierFormatError("not a safetensors file: malformed tensor entries") from None
    return dict(metadata), shapes


def classifier_from_bytes(
    blob: bytes, expected_num_classes: int, expected_class_names: Sequence[str]
) -> nn.Module:
    """Rebuild the ResNet-18 from a safetensors blob after checking its header.

    Checks, before any tensor is loaded: the blob parses as safetensors, ``architecture`` is resnet18,
    the head has ``expected_num_classes`` outputs, every parameter/buffer of the architecture is present
    with the right shape and nothing else is; and, when the blob names its classes, they are
    ``expected_class_names``.
    """
    metadata, shapes = read_classifier_header(blob)
    if metadata.get("architecture") != ARCHITECTURE:
        raise ClassifierFormatError(
            f"architecture metadata is {metadata.get('architecture')!r}, expected {ARCHITECTURE!r}"
        )
    fc_shape = shapes.get("fc.weight")
    if fc_shape is not None and len(fc_shape) == 2 and fc_shape[0] != expected_num_classes:
        raise ClassifierFormatError(
            f"classifier has {fc_shape[0]} classes (fc.weight {fc_shape}), expected {expected_num_classes}"
        )
    if "class_names" in metadata:
        try:
            names = json.loads(metadata["class_names"])
        except ValueError:
            raise ClassifierFormatError("class_names metadata is not a JSON list") from None
        if names != list(expected_class_names):
            raise ClassifierFormatError(f"classifier classes {names} differ from {list(expected_class_names)}")
    model = build_classifier(expected_num_classes)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    extra = sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & shapes.keys() if shapes[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if wrong:
        problems.append("wrong shapes " + ", ".join(f"{k} {shapes[k]} != {expected[k]}" for k in wrong[:5]))
    if problems:
        raise ClassifierFormatError("not a ResNet-18 state dict: " + "; ".join(problems))
    try:
        state = safetensors.torch.load(blob)
    except Exception as exc:  # SafetensorError: bad offsets, dtypes, truncated data
        raise ClassifierFormatError(f"not a safetensors file: {exc}") from None
    model.load_state_dict(state, strict=True)
    return model
