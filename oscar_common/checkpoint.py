"""Training checkpoints as safetensors: model, SGD momentum, LR schedule and history, never pickled.

Written atomically after every epoch, so a server killed mid-training resumes from its last complete
epoch and a half-written checkpoint is never read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from oscar_common.files import atomic_write_bytes

FORMAT = "oscar-train-checkpoint-1"


@dataclass
class TrainingProgress:
    epoch: int = 0  # epochs completed
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, progress: TrainingProgress) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "epoch": str(progress.epoch),
        "losses": json.dumps(progress.losses),
        "accuracies": json.dumps(progress.accuracies),
        "param_groups": json.dumps(opt_state["param_groups"]),
        "scheduler": json.dumps(scheduler.state_dict()),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainingProgress:
    """Restore everything :func:`save_checkpoint` wrote; raises ``ValueError`` for a foreign file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an OSCAR training checkpoint")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    return TrainingProgress(epoch=int(metadata["epoch"]), losses=json.loads(metadata["losses"]),
                            accuracies=json.loads(metadata["accuracies"]))
