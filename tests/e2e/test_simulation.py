"""README's simulation command, run twice as a newcomer would (fresh FLWR_HOME): Flower's own local
SuperLink, the installed environment (no per-run dependency install), two runs that both keep their results,
and a broken virtual client rejected in one named line instead of a Ray traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_support import FAST, hub_env
from oscar_demo.federation import PROJECT_DIR, free_port
from oscar_demo.watchdog import MARKER_VARIABLE, Watchdog, kill_marked, marked_processes
from oscar_common.run_config import main as oscar_config

pytestmark = pytest.mark.e2e
EXAMPLE = PROJECT_DIR / "examples" / "demo-simulation.toml"


def test_the_readme_simulation_command_twice(tmp_path: Path, tiny_hub: Path, demo_clients: dict[str, Path]) -> None:
    data = tmp_path / "data"
    shutil.copytree(next(iter(demo_clients.values())).parent, data)
    unrelated = data / "zz-unrelated" / "cat"  # a fourth client whose folders are no class of the run
    unrelated.mkdir(parents=True)
    shutil.copy(next((data / "plain" / "one").glob("*.png")), unrelated / "a.png")
    run_toml = tmp_path / "run.toml"
    assert oscar_config([str(EXAMPLE), f"simulation-data-dir='{data}'", f"run-dir='{tmp_path / 'runs'}'",
                         *(f"{k}={v}" for k, v in FAST.items() if k != "min-clients"), "min-images-per-class=2",
                         "--out", str(run_toml)]) == 0
    flwr_home = tmp_path / "flwr-home"
    # `flwr` starts the local SuperLink detached: the marker lets us (or the watchdog, if we are killed) find it
    marker = f"simulation-{os.getpid()}"
    watchdog = Watchdog(marker)
    env = {**os.environ, **hub_env(tiny_hub), "FLWR_HOME": str(flwr_home), MARKER_VARIABLE: marker,
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(PROJECT_DIR), "local", "--stream",
               "--federation-config", "num-supernodes=4", "--run-config", str(run_toml)]
    reports: list[Path] = []
    try:
        for attempt in range(2):
            result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "OSCAR status: partial" in result.stdout, result.stdout[-3000:]
            done = sorted((tmp_path / "runs").glob("run-*/report.json"), key=lambda p: p.stat().st_mtime)
            assert len(done) == attempt + 1, "a second run must get a run dir of its own"
            reports.append(done[-1])
            if attempt == 0:
                first = reports[0].read_bytes()
        assert reports[0].read_bytes() == first, "the second run changed the first run's report"
    finally:
        started = marked_processes(marker)
        kill_marked(marker)
        watchdog.stop()
    assert started, "the local SuperLink was not found"
    assert not marked_processes(marker)

    for path in reports:
        report = json.loads(path.read_text())
        assert sorted(c["name"] for c in report["clients"]) == ["inverted-noisy", "plain", "textured"]
        assert all(c["test_accuracy"] is not None for c in report["clients"])
        (rejected,) = report["rejected"]
        assert rejected["name"] == "zz-unrelated" and "is a class of this federation" in rejected["reason"]
        assert "\n" not in rejected["reason"] and "Traceback" not in rejected["reason"] and "\x1b" not in rejected["reason"]
    # the installed environment ran the apps: Flower created no per-run environment (no `uv sync`)
    assert not (flwr_home / "runtime-envs").exists()
    assert "environment Flower installed" not in result.stdout
