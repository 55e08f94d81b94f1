"""The report says what completed and what did not, names stand-in models, stays readable with 100 clients,
and report.json is the last file written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oscar_common.config import OscarConfig
from oscar_common.wire import Evaluation, Upload
from oscar_server import report as report_module
from oscar_server.outcomes import ClientOutcome, Rejection
from oscar_server.report import SAMPLE_COLUMNS, SAMPLE_ROWS, build_report, render_markdown, status_line, write_report
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.synthesis_jobs import SynthesisJob
from oscar_server.strategy import RunState

CLASSES = tuple(f"class_{i}" for i in range(25))


def _state(names: list[str], evaluated: set[str]) -> RunState:
    state = RunState()
    for node, name in enumerate(names):
        upload = Upload(class_ids=np.array([0, 1]), means=np.ones((2, 512), np.float32), scheme="pooled",
                        encoder_id="openai/clip-vit-base-patch32", client_name=name)
        outcome = ClientOutcome(node_id=node, upload=upload, upload_bytes=4200)
        if name in evaluated:
            outcome.evaluation = Evaluation(client_name=name, accuracy=0.5, num_examples=10, per_class={})
        else:
            outcome.not_evaluated("ClassifierFormatError: wrong classes")
        state.clients[node] = outcome
    return state


def test_status_says_what_completed_and_what_did_not() -> None:
    cfg = OscarConfig(class_names=CLASSES)
    assert build_report(cfg, _state(["a", "b"], {"a", "b"}))["status"] == "completed"
    state = _state(["a", "b"], {"a"})
    state.rejected.append(Rejection(node_id=9, name="c", reason="client failed: no data"))
    report = build_report(cfg, state)
    assert report["status"] == "partial"
    assert report["problems"] == ["c: upload rejected: client failed: no data",
                                  "b: no evaluation: ClassifierFormatError: wrong classes"]
    markdown = render_markdown(report)
    assert "Status: **partial**" in markdown and "- b: no evaluation: ClassifierFormatError" in markdown
    assert build_report(cfg, state, error="RuntimeError: boom")["status"] == "failed"


def test_report_states_the_prompt_template_and_the_official_overall() -> None:
    state = _state(["a", "b"], {"a", "b"})
    state.clients[1].evaluation = Evaluation(client_name="b", accuracy=0.9, num_examples=30, per_class={})  # a: 0.5 of 10
    markdown = render_markdown(build_report(OscarConfig(class_names=CLASSES), state))
    assert "through the template `{class_name}, {prompt}` (the class name in the prompt is this project's" in markdown
    assert "Overall accuracy **0.8000**: correct predictions / test images" in markdown  # (5 + 27) / 40
    assert "unweighted mean over clients 0.7000" in markdown
    ablation = render_markdown(build_report(OscarConfig(class_names=CLASSES, prompt_template="{prompt}"), state))
    assert "through the template `{prompt}`;" in ablation and "this project's addition" not in ablation
    tokens = render_markdown(build_report(OscarConfig(class_names=CLASSES, scheme="tokens"), state))
    assert "scheme `tokens`, the per-token caption mean itself, without the class name" in tokens


def test_stand_in_models_are_named(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OscarConfig(class_names=CLASSES)
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    report = build_report(cfg, _state(["a"], {"a"}))
    assert set(report["models"]["stand_ins"]) == {cfg.captioner, cfg.text_encoder, cfg.diffusion_model}
    assert "tiny random-weight stand-ins" in render_markdown(report)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent")
    assert build_report(cfg, _state(["a"], {"a"}))["models"]["stand_ins"] == {}


def test_samples_grid_stays_readable_with_a_hundred_clients(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    names = [f"client-{i:03d}" for i in range(100)]
    state = _state(names, set(names))
    jobs = []
    tile = Image.new("RGB", (8, 8), "red")
    for name in names:
        for class_id in range(len(CLASSES)):
            job = SynthesisJob(name, class_id, CLASSES[class_id], 0, seed=1, prompt="x")
            (run_dir.synthetic_dir / job.relative_path).parent.mkdir(parents=True, exist_ok=True)
            tile.save(run_dir.synthetic_dir / job.relative_path)
            jobs.append(job)
    state.synthesis = object()  # a synthesis ran; the grid reads the images from disk
    path = report_module.render_samples(run_dir, state, CLASSES, cell=32)
    with Image.open(path) as grid:
        assert grid.width == 110 + 32 * SAMPLE_COLUMNS
        assert grid.height == 22 + 32 * SAMPLE_ROWS + 22  # a footer saying how much is left out


def test_report_json_is_written_after_every_other_artefact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = RunDirectory(tmp_path)
    order = []
    real = report_module.atomic_write_bytes
    monkeypatch.setattr(report_module, "atomic_write_bytes", lambda p, d: (order.append(Path(p).name), real(p, d)))
    monkeypatch.setattr(report_module, "atomic_write_json", lambda p, o: order.append(Path(p).name))
    monkeypatch.setattr(report_module, "render_samples", lambda *a: order.append("samples.png"))
    report = write_report(OscarConfig(class_names=CLASSES), run_dir, _state(["a"], {"a"}))
    assert order == ["samples.png", "report.md", "report.json"]
    assert status_line(report, run_dir).startswith("OSCAR status: completed — mean accuracy 0.5")


def test_the_upload_counts_stay_out_of_the_report_unless_shared() -> None:
    report = build_report(OscarConfig(class_names=CLASSES), _state(["a"], {"a"}))
    assert report["clients"][0]["shared_counts"] is None
    assert "images_per_class" not in json.dumps(report)


def test_clients_are_listed_and_drawn_in_number_order(tmp_path: Path) -> None:
    """client-2 comes before client-10: the table reads in order and the grid's first columns are client-0..11."""
    names = [f"client-{i}" for i in range(13)]
    state = _state(names, set(names))
    report = build_report(OscarConfig(class_names=CLASSES), state)
    assert [c["name"] for c in report["clients"]] == names
    run_dir = RunDirectory(tmp_path)
    for name in names:
        job = SynthesisJob(name, 0, CLASSES[0], 0, seed=1, prompt="x")
        (run_dir.synthetic_dir / job.relative_path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "blue" if name == "client-12" else "red").save(run_dir.synthetic_dir / job.relative_path)
    state.synthesis = object()
    with Image.open(report_module.render_samples(run_dir, state, CLASSES, cell=32)) as grid:
        colours = {colour for _, colour in grid.convert("RGB").getcolors(1 << 16)}
    assert (255, 0, 0) in colours and (0, 0, 255) not in colours  # client-12 is the 13th: left out
