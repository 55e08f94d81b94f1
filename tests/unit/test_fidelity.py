"""The synthesis fidelity measure against hand-computed values, its summaries, the generate-per-class rules,
and the clear error of a CLIP checkpoint without a vision tower."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPTextModelWithProjection

from oscar_common.config import ConfigError, OscarConfig
from oscar_common.models.loading import NoVisionTowerError, load_clip_vision_encoder
from oscar_demo.tiny import save_tiny_clip
from oscar_server import preflight as preflight_module
from oscar_server.preflight import PreflightError, preflight
from oscar_server.stages.fidelity import FidelityRow, class_means, ranked_for_keeping, score_images, summarise

E1, E2, E3 = torch.eye(3)


def test_class_means_average_the_prototypes_and_are_unit_vectors() -> None:
    means = class_means([("a", 0), ("a", 0), ("b", 0)], torch.stack([E1, E2, 3 * E3]))
    assert torch.allclose(means[("a", 0)], torch.tensor([1, 1, 0]) / math.sqrt(2))
    assert torch.allclose(means[("b", 0)], E3)


def test_cosines_ranks_and_domain_retention_match_hand_computed_values() -> None:
    # Client a uploaded classes 0 (e1) and 1 (e2); client b only class 0 (e3).
    means = {("a", 0): E1, ("a", 1): E2, ("b", 0): E3}
    images = torch.tensor([
        [2.0, 0.0, 0.0],  # a/0: on its mean (norm 2: normalised first)
        [0.6, 0.8, 0.0],  # a/0: nearer a's class 1 (0.8) than its own (0.6)
        [0.8, 0.0, 0.6],  # b/0: its own mean 0.6, but a's mean of class 0 0.8: the domain is lost
        [0.0, 1.0, 0.0],  # a/1: only a uploaded class 1, no domain comparison
    ])
    scores = score_images(images, [("a", 0), ("a", 0), ("b", 0), ("a", 1)], means)
    assert [round(s.cosine, 6) for s in scores] == [1.0, 0.6, 0.6, 1.0]
    assert [s.rank for s in scores] == [1, 2, 1, 1]
    assert [s.top1 for s in scores] == [True, False, True, True]
    assert [s.domain_retained for s in scores] == [True, True, False, None]


def _row(client: str, class_id: int, index: int, cosine: float, top1: bool, domain: bool | None,
         kept: bool = True) -> FidelityRow:
    return FidelityRow(client, class_id, f"class{class_id}", index, "", cosine, 1 if top1 else 2, top1, domain, kept,
                       "")


def test_summaries_count_the_kept_images_per_client_and_pair() -> None:
    rows = [_row("a", 0, 0, 1.0, True, True), _row("a", 0, 1, 0.6, False, True), _row("a", 1, 0, 1.0, True, None),
            _row("b", 0, 0, 0.6, True, False), _row("b", 0, 1, 0.1, False, False, kept=False)]
    summary = summarise(rows, note="test", encoder="clip", seconds=0.123)
    assert (summary.generated, summary.kept, summary.seconds) == (5, 4, 0.12)
    a, b = summary.clients
    assert (a.client, a.images, a.mean_cosine, a.top1, a.domain_retention, a.domain_images) == (
        "a", 3, round(2.6 / 3, 4), round(2 / 3, 4), 1.0, 2)
    assert (b.client, b.images, b.mean_cosine, b.top1, b.domain_retention) == ("b", 1, 0.6, 1.0, 0.0)
    assert summary.overall.mean_cosine == 0.8 and summary.overall_generated.mean_cosine == round(3.3 / 5, 4)
    assert [(c.client, c.class_id, c.images) for c in summary.classes] == [("a", 0, 2), ("a", 1, 1), ("b", 0, 1)]
    assert [(c.client, c.class_id) for c in summary.lowest_classes(2)] == [("b", 0), ("a", 0)]
    assert type(summary).from_dict(summary.to_dict()) == summary


def test_keeping_ranks_by_cosine_then_index() -> None:
    rows = [_row("a", 0, i, c, True, None) for i, c in enumerate([0.2, 0.5, 0.2, 0.9])]
    assert [r.index for r in ranked_for_keeping(rows[::-1])] == [3, 1, 0, 2]


def test_generate_per_class_below_images_per_class_or_with_tokens_is_refused() -> None:
    assert OscarConfig().generated_per_class == 10
    assert OscarConfig.from_run_config({"generate-per-class": 20}).generated_per_class == 20
    with pytest.raises(ConfigError, match=r"generate-per-class \(5\) must be 0 or at least images-per-class \(10\)"):
        OscarConfig.from_run_config({"generate-per-class": 5})
    with pytest.raises(ConfigError, match="needs scheme 'pooled'.*set generate-per-class = 0"):
        OscarConfig.from_run_config({"generate-per-class": 20, "scheme": "tokens"})
    assert OscarConfig.from_run_config({"generate-per-class": 10, "scheme": "tokens"}).generated_per_class == 10


@pytest.fixture
def text_only_clip(tmp_path: Path) -> Path:
    """A CLIP checkpoint exported without its vision tower (text tower, tokenizer-free, image processor)."""
    full = save_tiny_clip(tmp_path / "clip")
    text_only = tmp_path / "text-only"
    CLIPTextModelWithProjection.from_pretrained(full).save_pretrained(text_only)
    CLIPImageProcessor.from_pretrained(full).save_pretrained(text_only)
    return text_only


def test_a_clip_without_vision_tower_is_named(tmp_path: Path, text_only_clip: Path) -> None:
    processor, model = load_clip_vision_encoder(str(tmp_path / "clip"), torch.device("cpu"), torch.float32)
    assert model.config.projection_dim == 512 and not model.training
    with pytest.raises(NoVisionTowerError, match=f"CLIP model '{text_only_clip}' has no vision tower"):
        load_clip_vision_encoder(str(text_only_clip), torch.device("cpu"), torch.float32)


def test_preflight_refuses_filtering_without_a_vision_tower(tiny_hub: Path, text_only_clip: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(preflight_module, "text_embedding_dim", lambda scheme, model_id: 512)  # the text side is fine
    cfg = OscarConfig(class_names=("a", "b"), text_encoder=str(text_only_clip), generate_per_class=20,
                      classifier_pretrained=False)
    with pytest.raises(PreflightError, match=f"CLIP model '{text_only_clip}' has no vision tower"):
        preflight(cfg, tmp_path / "run")
    preflight(cfg.replace(generate_per_class=0), tmp_path / "run")  # without filtering it only warns, later
