"""The synthesis stage on a run directory built without a federation (tiny models from ``tiny_hub``):
reruns, resumes, refuses changed settings, does not depend on upload order, and gives the same images on
one process as on two."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import oscar_server.stages.launcher as stage_launcher
from oscar_common.config import OscarConfig
from oscar_common.wire import Upload
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.launcher import StageFailed, launch_command, run_stage
from oscar_server.stages.stage import SYNTHESIS, TRAINING
from oscar_server.stages.synthesize import main, synthesize_run

CLASSES = "aircraft_carrier,cat,dog"
IMAGES = 2 * 2 + 2 * 2  # alpha: classes 0 and 1 (two prototypes), beta: classes 0 and 2; 2 images each


@pytest.fixture(autouse=True)
def offline_hub(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # child processes on the 2 shared cores


def stage_config(root: Path, **overrides) -> OscarConfig:
    return OscarConfig.from_run_config({
        "class-names": CLASSES, "device": "cpu", "inversion-tokens": 4, "inversion-steps": 6,
        "images-per-class": 2, "num-inference-steps": 2, "png-writers": 2,
        "run-dir": str(root.parent), "run-name": root.name, **overrides})


def payloads(scheme: str = "pooled") -> list[Upload]:
    rng = np.random.default_rng(0)
    shape = (512,) if scheme == "pooled" else (77, 32)  # CLIP projection / tiny SD text encoder states
    specs = {"beta": [0, 2], "alpha": [0, 1, 1]}  # alpha has two prototypes (means) of class 1
    out = []
    for name, class_ids in specs.items():
        means = rng.standard_normal((len(class_ids), *shape)).astype(np.float32)
        out.append(Upload(class_ids=np.array(class_ids), means=means, scheme=scheme, encoder_id="tiny",
                          client_name=name, prototypes_per_class=2))
    return out


def make_run(root: Path, cfg: OscarConfig, uploads: list[Upload]) -> RunDirectory:
    """A run dir as the ServerApp leaves it after the upload round, uploads arriving in the given order."""
    root.mkdir(parents=True)
    run_dir = RunDirectory(root)
    run_dir.save_config(cfg)
    for node_id, payload in enumerate(uploads):
        run_dir.save_payload(payload, node_id)
    run_dir.save_upload_round([(i, p.client_name, 1000) for i, p in enumerate(uploads)], [])
    return run_dir


def images(run_dir: RunDirectory) -> dict[Path, np.ndarray]:
    out = {}
    for path in sorted(run_dir.synthetic_dir.rglob("*.png")):
        with Image.open(path) as image:
            out[path.relative_to(run_dir.synthetic_dir)] = np.asarray(image.convert("RGB"), dtype=np.int16)
    return out


def mtimes(run_dir: RunDirectory) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run_dir.synthetic_dir.rglob("*.png")}


def test_cli_writes_prompts_and_images_reruns_resumes_and_refuses_other_settings(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run_dir = make_run(root, stage_config(root), payloads())
    main([str(root)])

    first = images(run_dir)
    assert len(first) == IMAGES
    assert sorted(str(p) for p in first)[:2] == ["aircraft_carrier/alpha__c0000__000.png",
                                                  "aircraft_carrier/alpha__c0000__001.png"]
    prompts = json.loads(run_dir.prompts_path.read_text())
    assert [(r["client"], r["class_id"], r["prototype"]) for r in prompts] == [
        ("alpha", 0, 0), ("alpha", 1, 0), ("alpha", 1, 1), ("beta", 0, 0), ("beta", 2, 0)]
    # Underscores become spaces in what Stable Diffusion reads; folders keep the class folder name.
    assert prompts[0]["prompt"] == f"aircraft carrier, {prompts[0]['decoded']}"
    assert prompts[0]["class_name"] == "aircraft_carrier"
    summary = SYNTHESIS.read_summary(run_dir)
    assert (summary.stage, summary.images, summary.generated, summary.processes) == ("synthesis", IMAGES, IMAGES, 1)
    assert summary.devices == ["cpu"] and summary.dtype == "float32" and summary.batch_size == 4
    assert summary.compile_seconds == 0.0 and summary.images_per_second > 0
    assert summary.prompts == prompts

    # A rerun on a finished stage generates nothing and touches nothing.
    before, prompt_bytes = mtimes(run_dir), run_dir.prompts_path.read_bytes()
    main([str(root)])
    assert SYNTHESIS.read_summary(run_dir).generated == 0
    assert mtimes(run_dir) == before

    # A stage killed part-way leaves some images missing: a rerun makes exactly those, the same ones.
    lost = [root / "synthetic" / "cat" / "alpha__c0001__001.png", root / "synthetic" / "dog" / "beta__c0002__000.png"]
    for path in lost:
        path.unlink()
    main([str(root)])
    assert SYNTHESIS.read_summary(run_dir).generated == 2
    after = mtimes(run_dir)
    assert {p: t for p, t in after.items() if p not in lost} == {p: t for p, t in before.items() if p not in lost}
    assert run_dir.prompts_path.read_bytes() == prompt_bytes
    again = images(run_dir)
    assert max(int(np.abs(again[p] - first[p]).max()) for p in first) <= 1

    # Other settings than those that made the images: refused, nothing reused or rewritten...
    before = mtimes(run_dir)
    with pytest.raises(SystemExit) as refused:
        main([str(root), "--set", "guidance-scale=3"])
    message = str(refused.value)
    assert "guidance-scale: 7.5 -> 3.0" in message and "oscar-synthesize RUN_DIR --fresh" in message
    assert mtimes(run_dir) == before
    with pytest.raises(SystemExit, match=r"unknown run-config key\(s\) in --set: \['guidance'\]"):
        main([str(root), "--set", "guidance=3"])

    # ...until --fresh discards the stage's outputs and makes them again.
    main([str(root), "--fresh", "--set", "guidance-scale=3"])
    fresh = images(run_dir)
    assert sorted(fresh) == sorted(first)
    assert min(float(np.abs(fresh[p] - again[p]).mean()) for p in first) > 0.5  # really made again, at g=3
    assert json.loads((root / "stages" / "synthesis.json").read_text())["guidance-scale"] == 3.0


def test_results_do_not_depend_on_the_order_uploads_arrived_in(tmp_path: Path) -> None:
    first = make_run(tmp_path / "a", stage_config(tmp_path / "a"), payloads())
    second = make_run(tmp_path / "b", stage_config(tmp_path / "b"), payloads()[::-1])
    assert [u["client_name"] for u in json.loads(second.uploads_path.read_text())["accepted"]] == ["alpha", "beta"]
    for run_dir in (first, second):
        synthesize_run(run_dir, stage_config(run_dir.root))
    assert first.prompts_path.read_text() == second.prompts_path.read_text()
    a, b = images(first), images(second)
    assert sorted(a) == sorted(b) and len(a) == IMAGES
    assert all(np.array_equal(a[p], b[p]) for p in a)


def test_tokens_scheme_conditions_on_the_uploaded_states(tmp_path: Path) -> None:
    root = tmp_path / "run"
    cfg = stage_config(root, scheme="tokens", **{"generation-batch-size": 3})
    run_dir = make_run(root, cfg, payloads("tokens"))
    summary = synthesize_run(run_dir, cfg)
    assert (summary.images, summary.generated, summary.batch_size, summary.prompts) == (IMAGES, IMAGES, 3, [])
    assert not run_dir.prompts_path.exists()
    pixels = images(run_dir)
    # alpha's class 1 alternates between its two prototypes: images 0 and 1 come from different means.
    assert np.abs(pixels[Path("cat/alpha__c0001__000.png")] - pixels[Path("cat/alpha__c0001__001.png")]).mean() > 1
    assert SYNTHESIS.read_summary(run_dir) == summary


def test_two_processes_make_the_images_of_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The tokens scheme (no prompt inversion), to keep the test short: it is about sharing out the images."""
    one = make_run(tmp_path / "one", stage_config(tmp_path / "one", scheme="tokens"), payloads("tokens"))
    summary = run_stage(SYNTHESIS, one, stage_config(one.root, scheme="tokens"))  # auto: 1 on CPU, in-process
    assert (summary.processes, summary.generated) == (1, IMAGES)

    cfg = stage_config(tmp_path / "two", scheme="tokens", **{"num-processes": 2})
    two = make_run(tmp_path / "two", cfg, payloads("tokens"))
    caplog.set_level("INFO", logger="oscar.stages")
    summary = run_stage(SYNTHESIS, two, cfg)

    assert (summary.processes, summary.devices, summary.generated) == (2, ["cpu", "cpu"], IMAGES)
    a, b = images(one), images(two)
    assert sorted(a) == sorted(b) and len(a) == IMAGES
    worst = max(int(np.abs(a[p] - b[p]).max()) for p in a)
    assert worst <= 1, f"an image differs from its one-process twin by {worst}/255"
    # Both children's log lines came through this process's log, each naming its process.
    lines = [r.getMessage() for r in caplog.records if r.name == "oscar.stages"]
    assert any("[synthesis]" in line and "[rank 1/2]" in line for line in lines)


def test_a_failed_child_names_the_stage_exit_code_and_last_lines(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = stage_config(tmp_path / "run", **{"num-processes": 2})
    run_dir = make_run(tmp_path / "run", cfg, payloads())
    script = "import sys; print('loading'); print('CUDA out of memory', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(stage_launcher, "launch_command", lambda *args: [sys.executable, "-c", script])
    with pytest.raises(StageFailed, match=r"the synthesis stage failed with exit code 3 .*\nloading\nCUDA out of memory"):
        run_stage(SYNTHESIS, run_dir, cfg)

    with pytest.raises(ValueError, match="differs from the configuration"):
        run_stage(SYNTHESIS, run_dir, cfg.replace(guidance_scale=2.0))


def test_launch_commands_and_child_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    cpu = launch_command(SYNTHESIS, run_dir, stage_config(run_dir.root), 2)
    assert cpu == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "oscar_server.stages.synthesize", str(run_dir.root)]

    gpu_cfg = stage_config(run_dir.root, device="auto", **{"accelerate-config": "/etc/acc.yaml"})
    monkeypatch.setattr(stage_launcher, "resolve_device", lambda name: stage_launcher.torch.device("cuda"))
    gpu = launch_command(TRAINING, run_dir, gpu_cfg, 8)
    assert gpu == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "8",
                   "--config_file", "/etc/acc.yaml", "-m", "oscar_server.stages.train", str(run_dir.root)]
    default = launch_command(SYNTHESIS, run_dir, gpu_cfg.replace(accelerate_config=""), 8)
    assert default[6] == "--main_process_port" and int(default[7]) > 0

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = stage_launcher.child_environment()
    project = Path(env["PYTHONPATH"].split(":")[0])
    assert (project / "oscar_server" / "stages" / "synthesize.py").exists() and env["PYTHONPATH"].endswith(":/elsewhere")
    assert env["HF_HUB_OFFLINE"] == "1"

    assert stage_launcher.num_processes("auto") == 1  # no CUDA here
    monkeypatch.setattr(stage_launcher.torch.cuda, "device_count", lambda: 4)
    assert (stage_launcher.num_processes("auto"), stage_launcher.num_processes("3")) == (4, 3)
