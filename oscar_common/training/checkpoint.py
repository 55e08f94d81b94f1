"""Training checkpoints as safetensors: model, SGD momentum, best weights and history, never pickled.

Written atomically after every epoch, so a server killed mid-training resumes from its last complete
epoch and a half-written checkpoint is never read. The learning rate is a function of the epoch
(:meth:`oscar_common.training.recipes.Recipe.lr_at`), so no scheduler state is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from oscar_common.files import atomic_write_bytes

FORMAT = "oscar-train-checkpoint-2"


@dataclass
class TrainingProgress:
    epoch: int = 0  # epochs completed
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    accuracies: list[float] = field(default_factory=list)  # training accuracy per epoch
    best_epoch: int = 0  # epoch whose weights are kept (best training accuracy, first of ties); 0: none
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # a copy of its weights

    @property
    def best_accuracy(self) -> float:
        return self.accuracies[self.best_epoch - 1] if self.best_epoch else -1.0


@dataclass
class CheckpointSnapshot:
    """What a checkpoint holds, detached from the training that goes on: tensor copies (still on the
    training device) and the history as text."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def snapshot_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        progress: TrainingProgress) -> CheckpointSnapshot:
    """Copies of everything :func:`write_checkpoint` stores. On a GPU they are device-to-device copies
    queued behind the last step (no host transfer, no synchronisation), so the step loop goes on at once
    while another thread moves them to the host and writes them."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    if progress.best_epoch != progress.epoch:  # else the best weights are the model's: not stored twice
        # best_state is already a private copy that training never changes in place.
        tensors.update({f"best.{k}": v for k, v in progress.best_state.items()})
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().clone()
    metadata = {
        "format": FORMAT,
        "epoch": str(progress.epoch),
        "losses": json.dumps(progress.losses),
        "accuracies": json.dumps(progress.accuracies),
        "best_epoch": str(progress.best_epoch),
        "param_groups": json.dumps(opt_state["param_groups"]),
    }
    return CheckpointSnapshot(tensors, metadata)


def write_checkpoint(path: Path, snapshot: CheckpointSnapshot) -> None:
    """Host copies, safetensors bytes, an atomic write: the slow part (~135 MB for ResNet-18 with its
    momentum), which the training loop runs in a background thread."""
    tensors = {k: v.cpu().contiguous() for k, v in snapshot.tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=snapshot.metadata))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainingProgress:
    """Restore everything :func:`write_checkpoint` wrote; raises ``ValueError`` for a foreign file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an OSCAR training checkpoint of format {FORMAT} (found "
                             f"{metadata.get('format')!r}); delete it to train from the start")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    progress = TrainingProgress(epoch=int(metadata["epoch"]), losses=json.loads(metadata["losses"]),
                                accuracies=json.loads(metadata["accuracies"]), best_epoch=int(metadata["best_epoch"]),
                                best_state={k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")})
    if progress.best_epoch == progress.epoch and progress.best_epoch:
        progress.best_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return progress
