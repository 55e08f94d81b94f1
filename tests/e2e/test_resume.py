"""A server killed (SIGKILL) during the upload round runs the round again; killed during synthesis and
again during training, it resumes without new uploads.

The final synthetic set must equal an uninterrupted synthesis from the same uploads and seed: same file
names, each image within 1/255 per pixel of its twin (a resumed run generates the remaining images in
other batch compositions, which can change float rounding by one grey level), none overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from e2e_support import hub_env
from PIL import Image

from oscar_common.config import OscarConfig
from oscar_demo.demo import demo_run_config
from oscar_demo.federation import ClientSpec, LocalFederation, descendants, signal_pids, wait_until
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.synthesize import synthesize_run

pytestmark = pytest.mark.e2e
IMAGES_PER_CLASS = 3


def _until(condition, what: str, report: Path) -> None:
    """wait_until that gives up at once when the run has failed instead of waiting out the timeout."""
    def met() -> bool:
        if report.exists() and json.loads(report.read_text()).get("status") == "failed":
            raise AssertionError(f"the run failed while waiting for {what}: {json.loads(report.read_text())['error']}")
        return condition()
    wait_until(met, what, 600)


def _kill_server_app(federation: LocalFederation) -> None:
    pids = federation.server_app_pids()
    assert len(pids) == 1, f"expected one ServerApp process, found {pids}"
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: not federation.server_app_pids(), "the ServerApp to die", 30)


def test_kill_during_upload_synthesis_and_training_then_resume(tmp_path: Path, tiny_hub: Path,
                                                               demo_clients: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clients = [ClientSpec(name, path) for name, path in sorted(demo_clients.items())[:2]]
    run_config = demo_run_config(tmp_path / "runs", "crashy", **{
        "images-per-class": IMAGES_PER_CLASS, "num-inference-steps": 20, "generation-batch-size": 4,
        "inversion-steps": 40, "epochs": 3, "batch-size": 16, "min-clients": 2, "min-images-per-class": 2})
    run_dir = RunDirectory(tmp_path / "runs" / "crashy")
    synthetic = run_dir.synthetic_dir
    expected = len(clients) * 10 * IMAGES_PER_CLASS
    env = hub_env(tiny_hub)

    uploader, held = (client.name for client in clients)
    upload = run_dir.payloads_dir / f"{uploader}.safetensors"

    with LocalFederation(tmp_path, clients, env=env, stream=False) as federation:
        # 0. killed in the upload round, after one upload was saved: the other client's ClientApp is held
        #    (SIGSTOP, with its data loaders) until the ServerApp is dead, so the round cannot have ended
        zeroth = federation.submit(run_config)
        wait_until(lambda: federation.client_app_pids(held), f"the train message to reach {held}", 300)
        stopped = {pid for app in federation.client_app_pids(held) for pid in (app, *descendants(app))}
        signal_pids(stopped, signal.SIGSTOP)
        try:
            _until(upload.exists, f"{uploader}'s upload", run_dir.report_json)
            _kill_server_app(federation)
        finally:
            signal_pids(stopped, signal.SIGCONT)  # it finishes its upload to the dead run
        federation.cancel(zeroth)
        assert not run_dir.uploads_path.exists()
        saved_upload = upload.stat().st_mtime_ns

        # 1. submitted again: the upload round is run again; killed in the middle of synthesis
        first = federation.submit(run_config)
        _until(lambda: 4 <= len(list(synthetic.rglob("*.png"))) < expected, "synthesis to be under way",
               run_dir.report_json)
        _kill_server_app(federation)
        federation.cancel(first)
        before = {p: p.stat().st_mtime_ns for p in synthetic.rglob("*.png")}
        assert not run_dir.report_json.exists()
        accepted = json.loads(run_dir.uploads_path.read_text())["accepted"]
        assert sorted(a["client_name"] for a in accepted) == [uploader, held]
        assert upload.stat().st_mtime_ns != saved_upload, f"{uploader} was not asked to upload again"
        assert 0 < len(before) < expected

        # 2. resumed, then killed in the middle of training (after at least one checkpointed epoch)
        second = federation.submit(run_config)
        _until(lambda: run_dir.checkpoint_path.exists(), "a training checkpoint", run_dir.report_json)
        assert not run_dir.model_path.exists(), "training finished before it could be interrupted"
        _kill_server_app(federation)
        federation.cancel(second)

        # 3. resumed again: runs to the end and broadcasts to the clients, which are still connected
        report = json.loads(federation.run(run_config, timeout=600).read_text())

    assert report["status"] == "completed", report["error"]
    assert report["resumed"] is True
    assert all(c["test_accuracy"] is not None for c in report["clients"])
    assert "upload" not in report["timings_seconds"]  # no second upload round
    files = sorted(p.relative_to(synthetic) for p in synthetic.rglob("*.png"))
    assert len(files) == expected and not list(synthetic.rglob("*.tmp"))
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items()), "an image was rewritten"

    # the uninterrupted reference: the same synthesis stage on the same uploads, in one go
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = RunDirectory(tmp_path / "reference")
    reference.root.mkdir()
    for name in ("config.json", "uploads.json", "payloads"):
        copy = shutil.copytree if (run_dir.root / name).is_dir() else shutil.copy
        copy(run_dir.root / name, reference.root / name)
    synthesize_run(reference, OscarConfig.from_run_config(run_config))
    assert sorted(p.relative_to(reference.synthetic_dir) for p in reference.synthetic_dir.rglob("*.png")) == files
    worst = max(int(np.abs(_pixels(synthetic / f) - _pixels(reference.synthetic_dir / f)).max()) for f in files)
    assert worst <= 1, f"an image differs from its uninterrupted twin by {worst}/255"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)
