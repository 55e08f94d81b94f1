"""Ten virtual clients on Flower's simulation engine, each holding its Dirichlet share of one tree of real
digits (the ``label-skew`` benchmark): the 10-client case of ``oscar_bench/federation/scale.py``, which measures 100,
300 and 1,000 (docs/scale.md). Checks what grows with the number of clients: every client uploads and
evaluates in waves of ``max-in-flight``, the report lists them in numeric order, samples.png keeps a
readable size, the server's log does not print a line per client per wait, and the clients keep one copy of
the broadcast model. And the benchmark stopped mid-round by SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_support import FAST, hub_env
from PIL import Image

from oscar_demo.demo_data import DIGIT_NAMES, make_digit_tree
from oscar_demo.federation import LocalFederation, descendants, is_running, wait_until
from oscar_demo.watchdog import process_stat, session_members
from oscar_server.report import SAMPLE_COLUMNS

pytestmark = pytest.mark.e2e
CLIENTS = 10


def test_ten_label_skew_clients_on_the_simulation_engine(tmp_path: Path, tiny_hub: Path) -> None:
    tree = make_digit_tree(tmp_path / "digits", per_class=30)  # 300 digits; alpha 0.5 leaves each client a class
    run_config = {**FAST, "class-names": ",".join(DIGIT_NAMES), "device": "cpu", "images-per-class": 1,
                  "num-inference-steps": 4, "inversion-steps": 20, "classifier-pretrained": False,
                  "classifier-image-size": 32, "min-clients": CLIENTS, "run-dir": str(tmp_path / "runs"),
                  "run-name": "ten", "benchmark": "label-skew", "benchmark-root": str(tree),
                  "num-clients": CLIENTS, "alpha": 0.5, "max-in-flight": 3}
    with LocalFederation(tmp_path / "federation", [], env=hub_env(tiny_hub), stream=False,
                         simulation_supernodes=CLIENTS,
                         simulation_config={"client-resources-num-cpus": 1}) as federation:
        report_path = federation.run(run_config, timeout=420)
    assert not federation.leftovers

    report = json.loads(report_path.read_text())
    assert report["status"] == "completed", report.get("error")
    names = [c["name"] for c in report["clients"]]
    assert names == [f"client-{k}" for k in range(CLIENTS)]  # numeric order: client-2 before client-10
    assert all(c["test_accuracy"] is not None for c in report["clients"]) and not report["rejected"]
    md = (report_path.parent / "report.md").read_text()
    assert md.index("| client-2 ") < md.index("| client-9 ")

    with Image.open(report_path.parent / "samples.png") as grid:  # one column per client, at most SAMPLE_COLUMNS
        assert grid.width <= 110 + 96 * min(CLIENTS, SAMPLE_COLUMNS)

    # The server says it is waiting when the count changes, not once per client per poll.
    server_log = "\n".join(p.read_text(errors="replace") for p in federation.logs_dir.glob("flwr-run-*.log"))
    assert server_log.count("waiting for") <= 3 * CLIENTS, server_log[-3000:]
    # both rounds went in waves of 3 (tests/unit/test_strategy.py: never more outstanding, same results)
    for round_ in ("upload", "evaluation"):
        assert f"{round_} round: {CLIENTS} messages, at most 3 outstanding (max-in-flight)" in server_log

    # Every client's output dir holds the broadcast model, and all of them are one file on disk.
    models = sorted((tree / ".oscar-output").rglob("*.safetensors"))
    assert len(models) >= CLIENTS
    assert len({(os.stat(p).st_dev, os.stat(p).st_ino) for p in models}) == 1


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the PID, names one process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class ProcessWatch:
    """Every process ever seen below ``root`` (by parent chain), and their sessions: what a run started,
    including what Flower detached into sessions of its own and what Ray started in them."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, int] = {}  # pid -> start time
        self.sessions: set[int] = set()
        self.own_session = os.getsid(0)

    def look(self) -> None:
        for pid in {self.root, *descendants(self.root)}:
            start, stat = _start_time(pid), process_stat(pid)
            if start is not None and stat is not None:
                self.seen.setdefault(pid, start)
                if stat[1] != self.own_session:
                    self.sessions.add(stat[1])

    def remaining(self) -> set[int]:
        """Live processes of the run: one seen (same PID and start time) or one in a session of the run."""
        same = {pid for pid, start in self.seen.items() if is_running(pid) and _start_time(pid) == start}
        return same | session_members(self.sessions)

    def kill_remaining(self) -> None:
        for pid in self.remaining():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_the_benchmark_stopped_mid_round_leaves_no_process(tmp_path: Path, stop: str) -> None:
    """SIGTERM to the benchmark's PID, or Ctrl-C (SIGINT to its process group, as a terminal sends it), while
    its virtual clients upload: nothing of the run is left (Flower's SuperLink, SuperExec and simulation
    process, Ray's GCS, raylet, workers and agents), found by parent chain and session, never by name."""
    out = tmp_path / "out"
    log_path = tmp_path / "benchmark.log"
    with open(log_path, "w") as log_file:
        # As from a terminal: a suite started in the background of a non-interactive shell hands its
        # children SIGINT ignored, and a Python started so never raises KeyboardInterrupt.
        bench = subprocess.Popen([sys.executable, "-m", "oscar_bench.federation.scale", "--clients", "4",
                                  "--out", str(out)], cwd=tmp_path, stdout=log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watch = ProcessWatch(bench.pid)
    run_logs = out / "work" / "simulation-4" / "logs"

    def uploading() -> bool:
        watch.look()
        if bench.poll() is not None:
            raise AssertionError(f"the benchmark ended before the round: {log_path.read_text()[-3000:]}")
        return any("accepted upload from node" in p.read_text(errors="replace") for p in run_logs.glob("flwr-run-*"))

    try:
        wait_until(uploading, "the first accepted upload", 300, poll=0.1)
        watch.look()
        ray = {pid: _cmdline(pid) for pid in watch.seen if "ray" in _cmdline(pid)}
        assert any("raylet" in cmd for cmd in ray.values()), ray  # the premise: Ray is running
        if stop == "sigterm":
            os.kill(bench.pid, signal.SIGTERM)
        else:
            os.killpg(bench.pid, signal.SIGINT)  # its group: the benchmark and its watchdog
        bench.wait(timeout=90)
        # its with-blocks stopped the federation before it exited; the watchdog stands down a moment later
        wait_until(lambda: not watch.remaining(), "the run's processes to end", 10, poll=0.2)
    finally:
        left = {pid: _cmdline(pid) for pid in watch.remaining()}
        watch.kill_remaining()
        if bench.poll() is None:
            bench.kill()
    assert not left, left
    assert bench.returncode == (143 if stop == "sigterm" else -signal.SIGINT)  # unwound, not killed outright
    assert len(watch.seen) > 10 and watch.sessions  # it did see the run's processes
