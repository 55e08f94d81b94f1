"""Training resumes from its last checkpoint exactly where an uninterrupted run would be."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oscar_common.training.checkpoint import load_checkpoint
from oscar_common.training.classifier import build_classifier
from oscar_common.training.image_cache import ImageCache, decode_images
from oscar_common.training.loop import train_classifier
from oscar_common.training.recipes import resolve_recipe

# Random crops and flips (reseeding must cover them) and an lr step after epoch 2 (it must survive too).
RECIPE = dataclasses.replace(resolve_recipe("augmented", epochs=3, lr=0.01, batch_size=8), lr_step_epochs=2)


@pytest.fixture(scope="module")
def dataset() -> ImageCache:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(24)]
    return decode_images(images, [i % 3 for i in range(24)], side=RECIPE.cache_size(16), device="cpu",
                         num_workers=0)


def _train(dataset, epochs: int, checkpoint: Path | None):
    model = build_classifier(3, seed=0)
    stats = train_classifier(model, dataset, recipe=dataclasses.replace(RECIPE, epochs=epochs), image_size=16,
                             seed=0, device="cpu", precision="fp32", checkpoint=checkpoint)
    return model, stats


def test_resumed_training_equals_uninterrupted(dataset, tmp_path: Path) -> None:
    reference, reference_stats = _train(dataset, 3, None)
    checkpoint = tmp_path / "checkpoint.safetensors"
    _train(dataset, 1, checkpoint)  # "killed" after epoch 1: the checkpoint holds epoch 1
    resumed, resumed_stats = _train(dataset, 3, checkpoint)  # a fresh process, same run dir
    assert resumed_stats.resumed_from_epoch == 1 and resumed_stats.epochs_run == 2
    assert resumed_stats.losses == pytest.approx(reference_stats.losses, rel=1e-6)
    assert resumed_stats.best_epoch == reference_stats.best_epoch
    assert resumed_stats.lrs == pytest.approx([0.01, 0.01, 0.001])
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    model = build_classifier(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    progress = load_checkpoint(checkpoint, model, optimizer)
    assert progress.epoch == 3 and len(progress.losses) == 3 and len(progress.accuracies) == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # the epoch-3 lr came back
    assert progress.best_epoch == reference_stats.best_epoch and set(progress.best_state) == set(model.state_dict())


def test_foreign_file_is_not_taken_for_a_checkpoint(dataset, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not an OSCAR training checkpoint"):
        _train(dataset, 1, path)


def test_best_weights_are_stored_only_when_they_are_not_the_model(tmp_path: Path) -> None:
    from oscar_common.training.checkpoint import TrainingProgress, snapshot_checkpoint, write_checkpoint

    model = build_classifier(3, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    best = {k: torch.full_like(v, 7) for k, v in model.state_dict().items()}
    for best_epoch, expected in ((2, best), (3, model.state_dict())):
        path = tmp_path / f"best-{best_epoch}.safetensors"
        saved = TrainingProgress(epoch=3, losses=[1.0, 0.5, 0.7],
                                 accuracies=[0.1, 0.9, 0.9 if best_epoch == 3 else 0.8], best_epoch=best_epoch,
                                 best_state=best if best_epoch == 2 else {})
        write_checkpoint(path, snapshot_checkpoint(model, optimizer, saved))
        progress = load_checkpoint(path, build_classifier(3), torch.optim.SGD(build_classifier(3).parameters(), lr=1))
        assert progress.best_epoch == best_epoch and progress.best_accuracy == 0.9
        assert all(torch.equal(progress.best_state[k], v) for k, v in expected.items())
    assert (tmp_path / "best-2.safetensors").stat().st_size > 1.9 * (tmp_path / "best-3.safetensors").stat().st_size


def test_the_step_loop_only_snapshots_the_writer_thread_serialises(dataset, tmp_path: Path, monkeypatch) -> None:
    """Host copies and the safetensors blob are built off the training thread (on a GPU they would stall
    the step loop every epoch); what the writer stores is the epoch's state, not what training does next."""
    import threading

    import oscar_common.training.checkpoint as checkpoint_module
    threads = []
    real_save = checkpoint_module.save

    def recording_save(tensors, metadata=None):
        threads.append(threading.current_thread().name)
        return real_save(tensors, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save", recording_save)
    _train(dataset, 2, tmp_path / "checkpoint.safetensors")
    assert len(threads) == 2 and all(name.startswith("checkpoint") for name in threads), threads

    model = build_classifier(3, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snapshot = checkpoint_module.snapshot_checkpoint(model, optimizer, checkpoint_module.TrainingProgress(epoch=1))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # the next epoch's steps, before the writer gets to the snapshot
    checkpoint_module.write_checkpoint(tmp_path / "snap.safetensors", snapshot)
    restored = build_classifier(3)
    load_checkpoint(tmp_path / "snap.safetensors", restored, torch.optim.SGD(restored.parameters(), lr=1))
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.items())
