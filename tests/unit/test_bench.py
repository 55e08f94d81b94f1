"""oscar-bench: the tiny run's JSON and markdown, ratios derived from measured times, guarded sections,
no Flower in its imports, and the full-size FLOP count (on the meta device: no memory, no time)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oscar_server.stages.generation as generation
from oscar_bench import cli, project
from oscar_bench.architectures import build_diffusion
from oscar_bench.sections import SECTIONS
from oscar_bench.sections.inversion import checks, cost_model
from oscar_bench.sections.synthesis import count_flops
from oscar_common.config import OscarConfig
from oscar_server.stages.generation import generate_images, prepare_pipeline

REPO = Path(__file__).resolve().parents[2]
SECTION_NAMES = ["peak", "synthesis", "training", "inversion", "fidelity", "client", "server-estimate"]


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    out_dir = tmp_path_factory.mktemp("bench")
    printed = _run(["--tiny", "--out", str(out_dir), "--device", "cpu"])
    return json.loads((out_dir / "bench.json").read_text()), (out_dir / "bench.md").read_text(), printed


def _resolve(doc: dict, path: str) -> float:
    section, key, name = path.split(".")
    (row,) = [r for r in doc["sections"][section]["rows"] if r["key"] == key]
    return row[name]


def test_json_has_the_machine_the_sections_and_the_targets(tiny_run):
    doc, _, _ = tiny_run
    assert doc["schema"] == "oscar-bench/1" and doc["mode"] == "tiny"
    assert doc["device"]["type"] == "cpu"
    assert set(doc["versions"]) >= {"torch", "diffusers", "transformers"}
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["dtypes"] == {"official": "float32", "project": "float32", "peak_matmul": "float32"}
    assert list(doc["sections"]) == SECTION_NAMES
    statuses = {name: s["status"] for name, s in doc["sections"].items()}
    assert statuses.pop("client") == "ok"
    assert set(statuses.values()) == {"ok"}, statuses
    keys = {name: [r["key"] for r in s.get("rows", [])] for name, s in doc["sections"].items()}
    assert keys["synthesis"] == ["official", "project", "bare"]
    assert keys["training"] == ["png_write", "project", "baseline", "baseline_large"]
    assert keys["inversion"] == ["sparse", "dense", "sparse_long", "ours", "reference"]
    assert keys["fidelity"] == ["tower", "files"]
    tower, files = doc["sections"]["fidelity"]["rows"]
    assert (tower["images"], tower["batch_size"], files["images"]) == (8, 8, 4)  # tiny: whole CPU batches
    assert tower["ms_per_image"] == pytest.approx(1000 * tower["seconds"] / tower["images"])
    assert keys["server-estimate"][-1] == "total"
    official, project = doc["sections"]["synthesis"]["rows"][:2]
    assert official["batch_size"] == 1 and official["images"] == 2 and project["images"] == project["batch_size"]
    assert project["warmup_seconds"] > 0
    # The project's path at the run config's defaults; on a CPU compile=auto compiles nothing.
    settings = doc["sections"]["synthesis"]["settings"]
    assert settings["batch_size"] == project["batch_size"] == 4 and settings["batch_size_auto"]  # CPU_BATCH_SIZE
    assert (settings["fuse_qkv"], settings["compile"], settings["compiled"]) == (True, "auto", False)
    assert (settings["png_writers"], settings["tf32"]) == (4, True)
    assert project["compile_seconds"] == settings["compile_seconds"] == 0.0
    assert doc["run_defaults"]["compile"] == "auto" and doc["run_defaults"]["inversion-chunk-size"] == 0
    assert doc["sections"]["inversion"]["chunk_size"] == 12  # the 12 targets fit one CPU chunk
    # Tiny: the targets are evaluated but do not apply (they speak of full-size models on an H200).
    assert [t["applies"] for t in doc["targets"]] == [False] * 6
    assert all(t["value"] is not None and isinstance(t["met"], bool) for t in doc["targets"])
    # The inversion figure comes from the cost model, not from a 1000-step run: the target row says so.
    assert [t["metric"] for t in doc["targets"] if t["projected"]] == ["inversion.ours.seconds"]
    client = {r["key"]: r for r in doc["sections"]["client"]["rows"]}["captioning"]
    assert client["pipeline_vs_bare"] == doc["sections"]["client"]["result"]["pipeline_vs_bare"]
    assert doc["targets"][-1]["value"] == client["pipeline_vs_bare"]


def test_every_rate_and_ratio_comes_from_the_recorded_times(tiny_run):
    doc, _, _ = tiny_run
    peak = _resolve(doc, "peak.matmul.tflops")
    assert peak == pytest.approx(_resolve(doc, "peak.matmul.flops") / _resolve(doc, "peak.matmul.seconds") / 1e12)
    rates = 0
    for name, section in doc["sections"].items():
        for row in section.get("rows", []):
            if "img_per_s" in row and "images" in row:
                assert row["img_per_s"] == pytest.approx(row["images"] / row["seconds"]), (name, row["key"])
                rates += 1
            if row.get("tflop_per_image"):
                assert row["tflops"] == pytest.approx(row["img_per_s"] * row["tflop_per_image"])
                assert row["pct_of_peak"] == pytest.approx(100 * row["tflops"] / peak)
    assert rates >= 7
    labels = [r["label"] for r in doc["ratios"]]
    assert "project / official-style (img/s)" in labels and len(labels) == 8
    for ratio in doc["ratios"]:
        assert ratio["value"] == pytest.approx(_resolve(doc, ratio["numerator"]) / _resolve(doc, ratio["denominator"]))
    # The synthesis ratio is the ratio of the two measured rates, each images / seconds of this run.
    official = doc["sections"]["synthesis"]["rows"][0]
    project = doc["sections"]["synthesis"]["rows"][1]
    speedup = (project["images"] / project["seconds"]) / (official["images"] / official["seconds"])
    assert doc["targets"][0]["value"] == pytest.approx(speedup)
    # Inversion projections follow from the three measured runs.
    rows = {r["key"]: r for r in doc["sections"]["inversion"]["rows"]}
    model = cost_model(rows["sparse"], rows["dense"], rows["sparse_long"])
    assert doc["sections"]["inversion"]["model"] == pytest.approx(model)
    assert rows["ours"]["seconds"] == pytest.approx(
        model["setup_seconds"] + 1000 * model["step_seconds"] + 21 * model["eval_seconds"])
    # The server estimate uses the measured rates.
    estimate = {r["key"]: r for r in doc["sections"]["server-estimate"]["rows"]}
    assert estimate["synthesis"]["seconds"] == pytest.approx(project["compile_seconds"] + project["warmup_seconds"])
    assert estimate["synthesis_images"]["seconds"] == pytest.approx(5400 / project["img_per_s"])
    assert estimate["training"]["seconds"] == pytest.approx(25 * 5400 / _resolve(doc, "training.project.img_per_s"))
    assert estimate["fidelity"]["seconds"] == pytest.approx(5400 / _resolve(doc, "fidelity.files.img_per_s"))
    assert estimate["total"]["seconds"] == pytest.approx(sum(r["seconds"] for k, r in estimate.items() if k != "total"))


def test_markdown_tables_are_written_and_printed_last(tiny_run):
    doc, markdown, printed = tiny_run
    assert printed.rstrip().endswith(markdown.rstrip())
    lines = markdown.splitlines()
    header = ("| path | dtype | batch | images | seconds | img/s | UNet calls/img | TFLOP/img | TFLOP/s | % of peak "
              "| warm-up s | compile s |")
    assert header in lines
    row = lines[lines.index(header) + 2]
    assert row.startswith("| official-style loop (1 image per call, PNG) | float32 | 1 | 2 |")
    assert "| ratio | value | = |" in lines
    assert any(line.startswith("| project / official-style (img/s) |") for line in lines)
    assert "| target | value | target | met |" in lines
    assert sum(line.startswith("| synthesis vs the official-style loop") for line in lines) == 1
    (inversion,) = [line for line in lines if line.startswith("| inversion of 540 means")]
    assert "(projected, not measured)" in inversion
    for name in SECTION_NAMES + ["targets"]:
        assert f"## {name}" in lines


def test_synthesis_times_the_stages_calls_and_reports_the_compile_seconds(tmp_path, monkeypatch):
    """What the synthesis section hands the stage's functions (through prepare_generation and generate_jobs),
    and where "compile s" comes from: prepare_pipeline's return value (here a stand-in figure: nothing
    compiles on a CPU)."""
    calls = {}

    def prepare(pipe, **kwargs):
        calls["prepare"] = kwargs
        prepare_pipeline(pipe, **kwargs)
        return 7.25

    def generate(pipe, jobs, out_dir, **kwargs):
        result = generate_images(pipe, jobs, out_dir, **kwargs)
        calls.setdefault("generate", []).append({**kwargs, "jobs": len(jobs), "written": len(result.written),
                                                 "pngs": len(list(Path(out_dir).rglob("*.png")))})
        return result

    monkeypatch.setattr(generation, "prepare_pipeline", prepare)
    monkeypatch.setattr(generation, "generate_images", generate)
    _run(["--tiny", "--out", str(tmp_path), "--device", "cpu", "--sections", "synthesis"])
    doc = json.loads((tmp_path / "bench.json").read_text())
    (row,) = [r for r in doc["sections"]["synthesis"]["rows"] if r["key"] == "project"]
    assert row["compile_seconds"] == 7.25
    assert calls["prepare"] == {"fuse_qkv": True, "compile": False, "compile_mode": "default", "batch_size": 4,
                                "resolution": 0, "guidance_scale": 7.5}
    warmup, timed_batches = calls["generate"]
    for call in (warmup, timed_batches):
        assert (call["batch_size"], call["png_writers"], call["num_inference_steps"]) == (4, 4, 4)
        assert call["jobs"] == call["written"] == call["pngs"] == 4
    assert row["images"] == timed_batches["written"]


def test_stage_cuda_settings_apply_the_stages_settings_and_restore_torchs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # configure_cuda acts only with CUDA
    torch.set_float32_matmul_precision("highest")  # torch's defaults, whatever ran before
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with project.stage_cuda_settings(OscarConfig()):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("training exploded")

    monkeypatch.setitem(SECTIONS, "training", dataclasses.replace(SECTIONS["training"], run=broken))
    printed = _run(["--tiny", "--out", str(tmp_path), "--device", "cpu",
                    "--sections", "server-estimate", "training", "peak"])
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert list(doc["sections"]) == ["peak", "training", "server-estimate"]  # the registry's order
    assert doc["sections"]["peak"]["status"] == "ok" and len(doc["sections"]["peak"]["rows"]) == 2
    training = doc["sections"]["training"]
    assert training["status"] == "failed" and training["error"] == "RuntimeError: training exploded"
    assert "broken" in training["traceback"]
    estimate = doc["sections"]["server-estimate"]
    assert estimate["status"] == "failed" and "synthesis.project.img_per_s" in estimate["error"]
    assert "**failed**: RuntimeError: training exploded" in printed
    assert [t["value"] for t in doc["targets"]] == [None] * 6


def test_the_import_closure_has_no_flower():
    code = ("import sys, pkgutil, importlib; sys.modules['flwr'] = None\n"
            "import oscar_bench, oscar_bench.cli\n"
            "names = [m.name for m in pkgutil.walk_packages(oscar_bench.__path__, 'oscar_bench.') if not m.name.endswith('__main__') and not m.name.startswith('oscar_bench.federation')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "print(len(names))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) >= 12  # every module was imported


def test_full_size_stable_diffusion_costs_82_8_tflop_per_image():
    """SD-1.4 at 512x512, 50 steps with CFG (docs/performance.md); counted here without any memory."""
    meta = torch.device("meta")
    parts = build_diffusion(meta, tiny=False)
    flops = count_flops(parts, resolution=512, device=meta)
    assert flops["unet_pair_tflop"] == pytest.approx(1.6065, abs=1e-3)
    assert flops["vae_decode_tflop"] == pytest.approx(2.5145, abs=1e-3)
    per_image = 50 * flops["unet_pair_tflop"] + flops["vae_decode_tflop"] + flops["text_sequence_tflop"]
    assert per_image == pytest.approx(82.86, abs=0.01)


def test_inversion_cost_model_separates_setup_steps_and_checks():
    # 2 s setup, 0.05 s per step, 0.2 s per check
    def run(steps, every):
        return {"steps": steps, "evals": checks(steps, every),
                "seconds": 2 + 0.05 * steps + 0.2 * checks(steps, every)}

    model = cost_model(run(20, 20), run(20, 1), run(40, 40))
    assert model == pytest.approx({"setup_seconds": 2.0, "step_seconds": 0.05, "eval_seconds": 0.2})
    assert (checks(1000, 50), checks(3000, 1), checks(20, 20), checks(7, 3)) == (21, 3000, 2, 3)
    assert math.isclose(checks(40, 40), 2)


def test_sections_past_the_budget_are_skipped_and_still_reported(tmp_path):
    printed = _run(["--tiny", "--out", str(tmp_path), "--device", "cpu", "--budget-seconds", "0",
                    "--sections", "peak", "inversion"])
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert {name: s["status"] for name, s in doc["sections"].items()} == {"peak": "skipped", "inversion": "skipped"}
    assert "budget" in doc["sections"]["peak"]["reason"]
    assert "**skipped**" in printed
