"""The ServerApp before and after the round: preflight before any message, a finished run left alone, the
status line as the run's last word."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from oscar_common.config import OscarConfig
from oscar_server import preflight as preflight_module
from oscar_server import server_app
from oscar_server.preflight import PreflightError, preflight

DIGITS = "zero,one,two"


class SilentGrid:
    """A grid nobody is connected to; records whatever the server tries to send."""

    def __init__(self) -> None:
        self.pushed: list = []

    def get_node_ids(self) -> list[int]:
        return []

    def push_messages(self, messages):  # pragma: no cover - must not be reached in these tests
        self.pushed += list(messages)
        return []


@pytest.fixture
def hub(tiny_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no ImageNet weights in there
    return tiny_hub


def _context(tmp_path: Path, **run_config) -> Context:
    config = {"class-names": DIGITS, "run-dir": str(tmp_path / "runs"), "run-name": "r", "min-clients": 1,
              "wait-for-clients-timeout": 0.2, **run_config}
    return Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=config)


def test_preflight_lists_every_missing_piece_at_once(hub: Path, tmp_path: Path) -> None:
    cfg = OscarConfig(class_names=("a", "b"), diffusion_model="nobody/missing-diffusion", classifier_pretrained=True)
    with pytest.raises(PreflightError) as info:
        preflight(cfg, tmp_path / "run")
    message = str(info.value)
    assert "'nobody/missing-diffusion' was not found locally" in message and "hf download" in message
    assert "ImageNet ResNet-18 weights" in message and "classifier-pretrained=false" in message


def test_preflight_checks_the_disk_and_the_run_dir(hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OscarConfig(class_names=tuple(f"c{i}" for i in range(90)), classifier_pretrained=False, min_clients=6)
    preflight(cfg, tmp_path / "run")  # fine as it is
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 10**9))
    with pytest.raises(PreflightError, match=r"has 1.0 GB free; .* 6 clients need about 2.8 GB"):
        preflight(cfg, tmp_path / "run")
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PreflightError, match="not writable"):
            preflight(cfg, locked / "run")


def test_a_failed_preflight_sends_nothing_and_says_why_last(hub: Path, tmp_path: Path) -> None:
    grid = SilentGrid()
    with pytest.raises(server_app.RunFailed) as info:
        server_app.main(grid, _context(tmp_path, **{"classifier-pretrained": True}))
    assert grid.pushed == []
    assert str(info.value).startswith("OSCAR status: failed — PreflightError: ")
    report = json.loads((tmp_path / "runs" / "r" / "report.json").read_text())
    assert report["status"] == "failed" and "ImageNet ResNet-18 weights" in report["error"]


def test_bad_values_fail_before_anything_is_written(hub: Path, tmp_path: Path) -> None:
    with pytest.raises(server_app.RunFailed, match="guidance-scale must be >= 1.*nothing was run"):
        server_app.main(SilentGrid(), _context(tmp_path, **{"guidance-scale": -1}))
    assert not (tmp_path / "runs").exists()


def test_a_finished_run_is_left_as_it_is(hub: Path, tmp_path: Path) -> None:
    report = tmp_path / "runs" / "r" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text('{"status": "completed"}')
    with pytest.raises(server_app.RunFailed, match="already finished .*left as it is.*oscar-config"):
        server_app.main(SilentGrid(), _context(tmp_path, **{"classifier-pretrained": False}))
    assert report.read_text() == '{"status": "completed"}'
    assert sorted(p.name for p in report.parent.iterdir()) == ["report.json"]
