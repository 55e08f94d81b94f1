"""Training resumes from its last checkpoint exactly where an uninterrupted run would be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oscar_common.checkpoint import load_checkpoint
from oscar_common.classifier import build_classifier, train_classifier, train_transform
from oscar_common.data import ImageListDataset


@pytest.fixture(scope="module")
def dataset() -> ImageListDataset:
    rng = np.random.default_rng(0)
    items = [(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), i % 3) for i in range(24)]
    return ImageListDataset(items, train_transform(16))  # random augmentations: reseeding must cover them


def _train(dataset, epochs: int, checkpoint: Path | None) -> tuple[torch.nn.Module, list[float]]:
    model = build_classifier(3, seed=0)
    stats = train_classifier(model, dataset, epochs=epochs, batch_size=8, lr=0.01, seed=0, device="cpu",
                             step_size=2, checkpoint=checkpoint)
    return model, stats.losses


def test_resumed_training_equals_uninterrupted(dataset, tmp_path: Path) -> None:
    reference, reference_losses = _train(dataset, 3, None)
    checkpoint = tmp_path / "checkpoint.safetensors"
    _train(dataset, 1, checkpoint)  # "killed" after epoch 1: the checkpoint holds epoch 1
    resumed, resumed_losses = _train(dataset, 3, checkpoint)  # a fresh process, same run dir
    assert resumed_losses == pytest.approx(reference_losses, rel=1e-6)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    model = build_classifier(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    progress = load_checkpoint(checkpoint, model, optimizer, scheduler)
    assert progress.epoch == 3 and len(progress.losses) == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # StepLR state came back too


def test_foreign_file_is_not_taken_for_a_checkpoint(dataset, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not an OSCAR training checkpoint"):
        _train(dataset, 1, path)
