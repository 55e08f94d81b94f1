"""The training stage (oscar-train RUN_DIR): reads a run dir, trains, resumes, reuses, refuses, skips bad images,
and trains the same model with 1 and 2 processes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import oscar_common.training.loop
from oscar_common.config import OscarConfig
from oscar_common.training.classifier import classifier_from_bytes
from oscar_common.wire import Upload
from oscar_server.outcomes import Rejection
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.fingerprint import StageSettingsChanged
from oscar_server.stages.launcher import run_stage
from oscar_server.stages.stage import TRAINING
from oscar_server.stages.train import SyntheticSetIncomplete, main, train_run

CLASSES = ("cat", "dog", "sea_horse")
SETTINGS = {"class-names": ",".join(CLASSES), "images-per-class": 4, "classifier-image-size": 32,
            "classifier-pretrained": False, "device": "cpu", "epochs": 2, "batch-size": 8, "seed": 0}


def make_run(root: Path, **overrides) -> Path:
    """A run dir after synthesis: 2 accepted clients (alice: all 3 classes, bob: cat and sea_horse), 4 images
    each as 32x32 PNGs with a class-dependent colour, plus files the stage must ignore."""
    cfg = OscarConfig.from_run_config({**SETTINGS, **overrides})
    run = RunDirectory(root)
    root.mkdir(parents=True)
    run.save_config(cfg)
    rng = np.random.default_rng(0)
    accepted = []
    for node, (client, class_ids) in enumerate((("alice", [0, 1, 2]), ("bob", [0, 2]))):
        payload = Upload(class_ids=np.array(class_ids), means=np.ones((len(class_ids), 8), np.float32),
                         scheme="pooled", encoder_id="x", client_name=client)
        run.save_payload(payload, node_id=node)
        accepted.append((node, client, 100))
        for class_id in class_ids:
            for index in range(cfg.images_per_class + 1):  # one index more than images-per-class: ignored
                pixels = rng.integers(0, 160, (32, 32, 3)) + np.array([95, 45, 0])[np.roll([0, 1, 2], class_id)]
                _png(run.synthetic_dir / CLASSES[class_id] / f"{client}__c{class_id:04d}__{index:03d}.png", pixels)
    _png(run.synthetic_dir / "cat" / "carol__c0000__000.png", np.zeros((32, 32, 3)))  # a rejected client's
    run.save_upload_round(accepted, rejected=[Rejection(node_id=9, name="carol", reason="test")])
    return root


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def _cfg(root: Path, **overrides) -> OscarConfig:
    return OscarConfig.from_run_config({**json.loads((root / "config.json").read_text()), **overrides})


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(root / "model.safetensors"))


def test_stage_trains_then_reuses_its_model(tmp_path: Path, caplog) -> None:
    root = make_run(tmp_path / "run")
    summary = train_run(root, _cfg(root))
    assert summary.status == "trained" and summary.images == summary.trained_images == 20  # 12 alice + 8 bob
    assert summary.unreadable_images == 0 and summary.classes == 3 and summary.image_size == 32
    assert summary.recipe["name"] == "official" and summary.recipe["batch_size"] == 8
    assert summary.recipe["lr"] == 5e-4 and summary.lrs == [5e-4, 5e-4]  # the recipe's lr (lr = 0)
    assert summary.epochs == summary.epochs_run == 2 and summary.resumed_from_epoch == 0
    assert summary.processes == 1 and summary.devices == ["cpu"] and summary.precision == "fp32"
    assert len(summary.losses) == len(summary.accuracies) == 2 and 1 <= summary.best_epoch <= 2
    assert summary.train_accuracy == max(summary.accuracies) and summary.images_per_second > 0
    assert TRAINING.read_summary(RunDirectory(root)) == summary  # what the launcher reads
    model = classifier_from_bytes((root / "model.safetensors").read_bytes(), 3, CLASSES)  # checks the class names
    assert model.fc.out_features == 3 and (root / "checkpoint.safetensors").exists()
    weights = _weights(root)

    TRAINING.summary_path(RunDirectory(root)).unlink()  # as the stage launcher does before every run
    with caplog.at_level(logging.INFO, logger="oscar.train"):
        again = train_run(root, _cfg(root))
    assert again.status == "reused" and again.losses == summary.losses and again.seconds == summary.seconds
    assert "reusing" in caplog.text and TRAINING.read_summary(RunDirectory(root)) == again
    assert all(torch.equal(weights[k], v) for k, v in _weights(root).items())


def test_killed_stage_resumes_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    overrides = {"train-recipe": "augmented"}  # random crops: resume must replay them too
    reference = make_run(tmp_path / "reference")
    train_run(reference, _cfg(reference, **overrides))

    root = make_run(tmp_path / "run")
    plan_epoch = oscar_common.training.loop.plan_epoch

    def killed_in_epoch_2(**kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt("killed in epoch 2")
        return plan_epoch(**kwargs)

    monkeypatch.setattr(oscar_common.training.loop, "plan_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_run(root, _cfg(root, **overrides))
    assert not (root / "model.safetensors").exists() and (root / "checkpoint.safetensors").exists()
    monkeypatch.undo()

    resumed = train_run(root, _cfg(root, **overrides))
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 1
    expected = TRAINING.read_summary(RunDirectory(reference))
    assert resumed.losses == pytest.approx(expected.losses, rel=1e-6)
    assert resumed.lrs == expected.lrs == [1e-3, 1e-3]
    for name, tensor in _weights(reference).items():
        assert torch.allclose(tensor.float(), _weights(root)[name].float(), atol=1e-6), name


def test_changed_settings_are_refused_until_fresh(tmp_path: Path) -> None:
    root = make_run(tmp_path / "run")
    train_run(root, _cfg(root))
    with pytest.raises(StageSettingsChanged, match=r"lr.*0\.0005.*0\.002.*oscar-train RUN_DIR --fresh"):
        train_run(root, _cfg(root, lr=0.002))
    with pytest.raises(SystemExit, match="oscar-train: .*--fresh"):  # the CLI says so without a traceback
        main([str(root), "--set", "lr=0.002"])

    main([str(root), "--fresh", "--set", "lr=0.002", "--set", "epochs=1"])
    summary = TRAINING.read_summary(RunDirectory(root))
    assert summary.status == "trained" and summary.recipe["lr"] == 0.002 and summary.epochs == 1


def test_outputs_without_a_settings_record_are_not_trusted(tmp_path: Path) -> None:
    root = make_run(tmp_path / "run")
    (root / "model.safetensors").write_bytes(b"made by an older version")
    with pytest.raises(StageSettingsChanged, match="no record of the settings.*--fresh"):
        train_run(root, _cfg(root))
    with pytest.raises(SystemExit, match="unknown run-config key.*epoch"):  # a typo is named, not ignored
        main([str(root), "--set", "epoch=3"])


def test_unreadable_synthetic_image_is_skipped_counted_and_named(tmp_path: Path, caplog) -> None:
    root = make_run(tmp_path / "run")
    bad = root / "synthetic" / "dog" / "alice__c0001__002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with caplog.at_level(logging.WARNING):
        summary = train_run(root, _cfg(root))
    assert summary.images == 20 and summary.unreadable_images == 1 and summary.trained_images == 19
    assert summary.unreadable == ["synthetic/dog/alice__c0001__002.png"]
    assert "synthetic/dog/alice__c0001__002.png" in caplog.text and "skipped 1 unreadable image(s) of 20" in caplog.text


def test_incomplete_synthetic_set_is_refused(tmp_path: Path) -> None:
    root = make_run(tmp_path / "run")
    for index in (1, 4):  # 3 of 4 left (index 4 is the spare one past images-per-class)
        (root / "synthetic" / "sea_horse" / f"bob__c0002__{index:03d}.png").unlink()
    with pytest.raises(SyntheticSetIncomplete, match=r"bob/sea_horse: 3.*oscar-synthesize"):
        train_run(root, _cfg(root))


def test_one_and_two_processes_train_the_same_model(tmp_path: Path, monkeypatch) -> None:
    # 20 images, one unreadable (decoded by the second process: the 4th in order), 19 in batches of 10:
    # 10 then 9, split 5/5 and 5/4 between the processes. Random crops and flips, BatchNorm statistics and
    # the loss scale must all come out as with one process. A small lr: at 32 px the last BatchNorms see
    # 1x1 maps of ~10 images, and at lr 1e-3 float32 rounding alone (1 vs 2 threads in one process) grows
    # to ~1e-3 within 4 steps; at 2e-5 both runs agree to ~1e-6 (measured), while unsynchronised
    # BatchNorm misses by 2e-1 and a loss scale that ignores the process count by 6e-3.
    overrides = {"train-recipe": "augmented", "batch-size": 10, "epochs": 2, "lr": 2e-5}
    one = make_run(tmp_path / "one", **overrides)
    (one / "synthetic" / "dog" / "alice__c0001__000.png").write_bytes(b"not a png")
    two = tmp_path / "two"
    shutil.copytree(one, two)
    # Through the server's stage launcher: in this process, and as `torchrun --nproc_per_node 2 -m
    # oscar_server.stages.train` (which reads the run's config.json, so that says num-processes = 2 too).
    single = run_stage(TRAINING, RunDirectory(one), _cfg(one))
    cfg_two = _cfg(two, **{"num-processes": "2"})
    RunDirectory(two).save_config(cfg_two)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    double = run_stage(TRAINING, RunDirectory(two), cfg_two)
    assert double.processes == 2 and double.devices == ["cpu:0", "cpu:0"] and single.processes == 1
    assert double.unreadable == single.unreadable == ["synthetic/dog/alice__c0001__000.png"]
    assert double.trained_images == single.trained_images == 19
    assert double.losses == pytest.approx(single.losses, rel=1e-5)
    assert double.accuracies == single.accuracies and double.best_epoch == single.best_epoch
    # The kept model and the last epoch's weights (in the checkpoint), BatchNorm running stats included.
    for name in ("model.safetensors", "checkpoint.safetensors"):
        a, b = (safetensors.torch.load_file(str(root / name)) for root in (one, two))
        for key in a:
            if not key.startswith("optimizer."):
                assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-5), (name, key)
