"""scripts/gpu-check.sh, the GPU acceptance command, rehearsed on the CPU: its step (a) on tiny configs
(the same model export, run directory, stage commands and checks as on a GPU), and the pieces it is
built from. A GPU run costs minutes of a lent machine, so everything that can fail before the GPU matters
is made to fail here first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oscar_bench.hub_export import export_server_models
from oscar_common.config import OscarConfig
from oscar_common.models.loading import load_clip_text_encoder, load_diffusion_pipeline, stand_in_note
from oscar_demo.tiny import CLIP_ID, DIFFUSION_ID, offline_hub_env

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def test_step_a_on_tiny_configs_passes_every_check(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_NO_WHEELS": "1", "GPU_CHECK_TINY": "1",
           "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_WORK": str(tmp_path / "work"), "STEPS": "a",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in (out / "summary.md").read_text().splitlines()[2:]]
    checks = [row.split(" | ")[1] for row in rows]
    assert checks == ["imports", "models exported", "synthesis", "training", "synthesis again"]
    assert all(" | passed | " in row for row in rows), rows
    synthesis = json.loads((out / "synthesis-summary.json").read_text())
    training = json.loads((out / "training-summary.json").read_text())
    assert synthesis["generated"] == synthesis["images"] == 2 * 3 * 2  # 2 clients x 3 classes x 2 images
    assert synthesis["peak_memory_gb"] is None and training["status"] == "trained"
    assert re.search(r"\| synthesis again \| passed \| exit 0; generated 0 ", (out / "summary.md").read_text())
    assert "===== synthesis again" in (out / "stages.log").read_text()
    assert (out / "gpu-check.log").stat().st_size > 0


def test_exported_models_load_by_hub_id_and_say_they_are_stand_ins(tmp_path: Path, monkeypatch) -> None:
    """The same export as on the GPU (architectures assembled, saved under the hub ids), on tiny configs."""
    export_server_models(tmp_path, torch.device("cpu"), tiny=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_diffusion_pipeline(DIFFUSION_ID, torch.device("cpu"), torch.float32, scheduler="pndm")
    tokenizer, text_model = load_clip_text_encoder(CLIP_ID, torch.device("cpu"), torch.float32)
    assert text_model.config.projection_dim == 512 and len(tokenizer) == 49408
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert "random-weight stand-in with the tiny architecture" in stand_in_note(DIFFUSION_ID)
    snapshot = next((tmp_path / "models--openai--clip-vit-base-patch32" / "snapshots").iterdir())
    config = json.loads((snapshot / "config.json").read_text())
    assert config["vision_config"]["patch_size"] == 8 and (snapshot / "processor_config.json").exists()


def test_run_dir_holds_a_finished_upload_round_of_unit_means(tmp_path: Path) -> None:
    cfg = OscarConfig.from_run_config({"class-names": ",".join(f"c{i}" for i in range(5)), "device": "cpu",
                                       "run-dir": str(tmp_path), "run-name": "run"})
    run_dir = gpu_check.make_run_dir(tmp_path / "run", cfg, clients=2, classes_per_client=3)
    uploads = run_dir.accepted_uploads()
    assert [u.client_name for u in uploads] == ["client-0", "client-1"]
    assert [u.class_ids.tolist() for u in uploads] == [[0, 1, 2], [0, 3, 4]]  # wraps around the 5 classes
    for upload in uploads:
        assert upload.means.shape == (3, 512) and np.allclose(np.linalg.norm(upload.means, axis=1), 1, atol=1e-5)
    assert json.loads(run_dir.config_path.read_text())["class-names"] == cfg.to_dict()["class-names"]


def test_a_recompilation_in_a_stage_log_fails_its_check(tmp_path: Path) -> None:
    log = tmp_path / "stages.log"
    script = tmp_path / "fake_stage.py"
    script.write_text("import sys\nprint('V1204 Recompiling function forward in unet.py:1')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code, recompiles, _ = gpu_check.run_stage("fake_stage", tmp_path, env, log, "synthesis")
    assert (code, recompiles) == (0, 1)
    code, recompiles, _ = gpu_check.run_stage("fake_stage", tmp_path, env, log, "synthesis again")
    assert recompiles == 1  # counted per stage run, not over the whole log


def test_federation_check_wants_completed_with_every_stage_on_the_device(tmp_path: Path) -> None:
    report = {"status": "completed", "clients": [{"test_accuracy": 0.1}, {"test_accuracy": None}],
              "stages": [{"stage": "upload", "devices": None}, {"stage": "synthesis", "devices": ["cuda:0"]},
                         {"stage": "training", "devices": ["cuda:0"]}]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert gpu_check.federation_check(path, "cuda") == (
        True, "status completed, 1 clients evaluated, stages on cuda:0")
    assert not gpu_check.federation_check(path, "cpu")[0]  # a stage that fell back to the CPU fails
    report["status"] = "partial"
    path.write_text(json.dumps(report))
    assert not gpu_check.federation_check(path, "cuda")[0]
    assert gpu_check.federation_check(None, "cuda") == (False, "no report.json")


def test_bench_check_fails_on_a_failed_section_and_names_projected_figures(tmp_path: Path) -> None:
    doc = {"sections": {"synthesis": {"status": "ok"}, "inversion": {"status": "ok"}},
           "targets": [{"name": "inversion", "value": 42.0, "unit": "s", "projected": True, "met": True},
                       {"name": "training", "value": 3000.0, "unit": "img/s", "projected": False, "met": False},
                       {"name": "client", "value": None, "unit": "x", "met": None}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    passed, figures = gpu_check.bench_check(path)
    assert passed and figures == ("synthesis ok, inversion ok. Targets: inversion: 42 s (projected) met; "
                                  "training: 3000 img/s MISSED")
    doc["sections"]["synthesis"]["status"] = "failed"
    path.write_text(json.dumps(doc))
    assert not gpu_check.bench_check(path)[0]
