"""The synthesis fidelity through the real synthesis stage on the tiny models: fidelity.json, the summary and
the report; generate-per-class keeps the images of highest cosine, stably across reruns; tokens is not
measured and says why."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import oscar_server.stages.synthetic_selection as selection
from oscar_common.config import OscarConfig
from oscar_common.models.loading import NoVisionTowerError
from oscar_common.wire import Upload
from oscar_server.report import build_report, render_markdown, write_report
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.stage import SYNTHESIS
from oscar_server.stages.synthesize import synthesize_run
from oscar_server.stages.train import training_images
from oscar_server.strategy import RunState

CLASSES = "cat,dog"


@pytest.fixture(autouse=True)
def offline_hub(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def config(root: Path, **overrides) -> OscarConfig:
    return OscarConfig.from_run_config({
        "class-names": CLASSES, "device": "cpu", "inversion-tokens": 2, "inversion-steps": 2,
        "images-per-class": 2, "num-inference-steps": 1, "run-dir": str(root.parent), "run-name": root.name,
        **overrides})


def run_with_uploads(root: Path, cfg: OscarConfig) -> RunDirectory:
    """Clients a (cat, dog) and b (cat), as the ServerApp leaves them after the upload round."""
    rng = np.random.default_rng(0)
    shape = (512,) if cfg.scheme == "pooled" else (77, 32)
    root.mkdir(parents=True)
    run_dir = RunDirectory(root)
    run_dir.save_config(cfg)
    uploads = [Upload(class_ids=np.array(ids), means=rng.standard_normal((len(ids), *shape)).astype(np.float32),
                      scheme=cfg.scheme, encoder_id="tiny", client_name=name)
               for name, ids in (("a", [0, 1]), ("b", [0]))]
    for node_id, upload in enumerate(uploads):
        run_dir.save_payload(upload, node_id)
    run_dir.save_upload_round([(i, u.client_name, 1000) for i, u in enumerate(uploads)], [])
    return run_dir


def report_of(cfg: OscarConfig, run_dir: RunDirectory) -> dict:
    state = RunState()
    state.synthesis = SYNTHESIS.read_summary(run_dir)
    return write_report(cfg, run_dir, state)


def test_the_stage_measures_every_image_and_the_report_shows_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    cfg = config(root)
    run_dir = run_with_uploads(root, cfg)
    synthesize_run(run_dir, cfg)

    record = json.loads(run_dir.fidelity_path.read_text())
    assert record["measured"] and record["encoder"] == cfg.text_encoder
    rows = record["images"]
    assert [(r["client"], r["class_name"], r["index"]) for r in rows] == [
        ("a", "cat", 0), ("a", "cat", 1), ("a", "dog", 0), ("a", "dog", 1), ("b", "cat", 0), ("b", "cat", 1)]
    assert all(r["kept"] and (root / r["path"]).is_file() and -1 <= r["cosine"] <= 1 for r in rows)
    assert all(r["rank"] in (1, 2) for r in rows if r["client"] == "a")
    assert [r["domain_retained"] is None for r in rows] == [False, False, True, True, False, False]

    summary = SYNTHESIS.read_summary(run_dir)  # read back from JSON: typed again
    assert summary.training_images == 6 and summary.fidelity.measured and summary.fidelity.kept == 6
    assert [c.client for c in summary.fidelity.clients] == ["a", "b"]
    assert summary.fidelity.clients[1].domain_images == 2 and summary.fidelity.clients[0].domain_images == 2

    report = report_of(cfg, run_dir)
    assert report["fidelity"]["measured"] and report["fidelity"]["stand_in_models"]
    assert len(report["fidelity"]["lowest_classes"]) == 3
    markdown = run_dir.report_md.read_text()
    assert "## Synthesis fidelity" in markdown and "these figures are noise" in markdown
    assert "| client | images | mean cosine | top-1 retrieval | domain retention |" in markdown
    assert re.search(r"\| b \| 2 \| -?\d\.\d{3} \| \d\.\d{3} \| \d\.\d{3} of 2 \|", markdown)
    assert run_dir.fidelity_png.is_file()

    # A rerun measures nothing again: the rows are reused as they are.
    synthesize_run(run_dir, cfg)
    assert json.loads(run_dir.fidelity_path.read_text()) == record


def _embedding_with_cosine(mean: torch.Tensor, cosine: float, seed: int) -> torch.Tensor:
    """A unit vector at exactly ``cosine`` to the unit vector ``mean``."""
    other = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    other = torch.nn.functional.normalize(other - (other @ mean) * mean, dim=-1)
    return cosine * mean + math.sqrt(1 - cosine**2) * other


COSINES = [0.3, 0.9, 0.1, 0.7]  # by image index: the kept two are indices 1 and 3


def test_generate_per_class_keeps_the_highest_cosines_and_stays_stable(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "run"
    cfg = config(root, **{"generate-per-class": 4})
    run_dir = run_with_uploads(root, cfg)
    uploads = {u.client_name: u for u in run_dir.accepted_uploads()}
    measured: list[Path] = []

    def known_embeddings(paths, processor, model, batch_size):  # the vision tower, stubbed at the edge
        out = []
        for path in paths:
            client, class_id, index = re.match(r"(.+)__c(\d+)__(\d+)\.png", path.name).groups()
            upload = uploads[client]
            row = list(upload.class_ids).index(int(class_id))
            mean = torch.nn.functional.normalize(torch.from_numpy(upload.means[row]).float(), dim=-1)
            out.append(_embedding_with_cosine(mean, COSINES[int(index)], seed=len(out)))
            measured.append(path)
        return torch.stack(out)

    monkeypatch.setattr(selection, "embed_image_files", known_embeddings)
    summary = synthesize_run(run_dir, cfg)
    assert (summary.images, summary.generated, summary.training_images) == (12, 12, 6)
    assert len(measured) == 12

    def kept_names() -> list[str]:
        return sorted(p.name for p in run_dir.synthetic_dir.rglob("*.png"))

    assert kept_names() == ["a__c0000__001.png", "a__c0000__003.png", "a__c0001__001.png", "a__c0001__003.png",
                            "b__c0000__001.png", "b__c0000__003.png"]
    assert len(list(run_dir.set_aside_dir.rglob("*.png"))) == 6
    rows = json.loads(run_dir.fidelity_path.read_text())["images"]
    assert {(r["index"], r["kept"], r["path"].split("/")[0]) for r in rows} == {
        (0, False, "synthetic-set-aside"), (1, True, "synthetic"), (2, False, "synthetic-set-aside"),
        (3, True, "synthetic")}
    assert [round(r["cosine"], 5) for r in rows[:4]] == COSINES
    assert summary.fidelity.overall.mean_cosine == 0.8 and summary.fidelity.overall_generated.mean_cosine == 0.5
    assert [name.split("/")[-1] for name, _ in training_images(run_dir, cfg)] == kept_names()
    markdown = render_markdown(build_report(cfg, _state(summary)))
    assert "12 images (12 generated in this run, 6 kept for training)" in markdown
    assert "the 6 of highest cosine kept" in markdown

    # A rerun generates and measures nothing and moves nothing: the kept set stays.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    again = synthesize_run(run_dir, cfg)
    assert (again.generated, len(measured)) == (0, 12)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before
    assert json.loads(run_dir.fidelity_path.read_text())["images"] == rows

    # generate-per-class back to 0: the first images-per-class train again, none generated.
    plain = synthesize_run(run_dir, config(root))
    assert plain.generated == 0
    assert sorted(p.name for p in run_dir.synthetic_dir.rglob("*.png")) == [
        "a__c0000__000.png", "a__c0000__001.png", "a__c0000__003.png", "a__c0001__000.png", "a__c0001__001.png",
        "a__c0001__003.png", "b__c0000__000.png", "b__c0000__001.png", "b__c0000__003.png"]


def _state(summary) -> RunState:
    state = RunState()
    state.synthesis = summary
    return state


def test_tokens_is_not_measured_and_says_why(tmp_path: Path) -> None:
    root = tmp_path / "run"
    cfg = config(root, scheme="tokens")
    run_dir = run_with_uploads(root, cfg)
    summary = synthesize_run(run_dir, cfg)
    assert not summary.fidelity.measured and summary.training_images == 6
    assert json.loads(run_dir.fidelity_path.read_text()) == {
        "measured": False, "note": summary.fidelity.note, "encoder": None, "images": []}
    markdown = render_markdown(build_report(cfg, _state(summary)))
    assert "Fidelity not measured: with scheme 'tokens' the uploads are per-token states" in markdown


def test_a_clip_without_vision_tower_stops_filtering_but_not_a_plain_run(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def no_vision_tower(model_id, device, dtype):
        raise NoVisionTowerError(model_id, "its config has no vision_config")

    monkeypatch.setattr(selection, "load_clip_vision_encoder", no_vision_tower)
    root = tmp_path / "run"
    cfg = config(root)
    run_dir = run_with_uploads(root, cfg)
    summary = synthesize_run(run_dir, cfg)
    assert not summary.fidelity.measured and summary.training_images == 6
    assert summary.fidelity.note.startswith(f"not measured: CLIP model '{cfg.text_encoder}' has no vision tower")
    with pytest.raises(NoVisionTowerError, match="use a full CLIP checkpoint"):
        synthesize_run(run_dir, config(root, **{"generate-per-class": 3}))
