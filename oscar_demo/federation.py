"""A real Flower federation on 127.0.0.1: one SuperLink, one SuperNode per client, ``flwr run``.

Used by ``make demo`` and by the end-to-end tests. Every process it starts runs in its own session
(process group) and is stopped by its own PID when the federation closes, also on Ctrl-C or failure,
with everything it started and whatever is left in those sessions (Ray's agents).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli_w

from oscar_common.run_config import run_config_problems
from oscar_demo.watchdog import MARKER_VARIABLE, Watchdog, process_stat, session_members, signal_pids
from oscar_deploy.launch import node_config_arg, venv_bin

log = logging.getLogger("oscar.demo")
PROJECT_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "oscar-local"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ClientSpec:
    name: str
    data_dir: Path
    extra_node_config: dict[str, Any] = field(default_factory=dict)


def client_threads(cores: int, clients: int) -> int:
    """Intra-op threads per client process when ``clients`` of them share ``cores``: at least one."""
    return max(1, cores // max(1, clients))


class LocalFederation:
    """Start with ``with LocalFederation(workdir, clients, env) as fed: fed.run(run_config)``."""

    def __init__(self, workdir: Path, clients: list[ClientSpec], env: dict[str, str] | None = None,
                 stream: bool = True, simulation_supernodes: int = 0,
                 simulation_config: dict[str, Any] | None = None) -> None:
        """``simulation_supernodes > 0``: a SuperLink in simulation mode with that many virtual
        SuperNodes (Flower's simulation engine, what ``flwr run .`` uses locally) instead of real ones.
        ``simulation_config``: more ``--federation-config`` keys for it, e.g. ``{"client-resources-num-cpus": 1}``
        (Flower's default reserves 2 CPUs per virtual client: on a 2-core machine they run one at a time)."""
        self.workdir = Path(workdir).resolve()
        self.clients = clients
        self.stream = stream
        self.simulation_supernodes = simulation_supernodes
        self.simulation_config = dict(simulation_config or {})
        self.logs_dir = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr-home"
        # flower-superlink starts flower-superexec by name: the venv's bin must be on PATH.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # Every process of this federation carries this marker: a watchdog finds them all if we are killed.
        self.marker = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.watchdog: Watchdog | None = None
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.flwr_home), "PYTHONUNBUFFERED": "1",
                    MARKER_VARIABLE: self.marker,
                    **(env or {})}
        self.superlink_port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopped: set[int] = set()  # after stop(): every PID it found, and those that survived it
        self.leftovers: set[int] = set()
        self._submissions = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.watchdog = Watchdog(self.marker)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._write_connection()
        self._spawn("superlink", [
            venv_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.superlink_port),
            # The project is installed already; per-run installs would need the internet.
            "--disable-runtime-dependency-installation",
            *(["--simulation"] if self.simulation_supernodes else []),
        ])
        self._wait_for_port(self.superlink_port, "superlink")
        for client in self.clients:
            out_dir = self.workdir / "client-output" / client.name
            node_config = {"data-dir": str(client.data_dir), "name": client.name, "output-dir": str(out_dir),
                           **client.extra_node_config}
            self._spawn(f"supernode-{client.name}", [
                venv_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.superlink_port}",
                "--port", str(free_port()), "--node-config", node_config_arg(node_config),
            ], env=self.supernode_env())
        log.info("federation up: superlink on 127.0.0.1:%d, %d supernodes%s (logs in %s)", self.superlink_port,
                 self.simulation_supernodes or len(self.clients),
                 " (simulated)" if self.simulation_supernodes else "", self.logs_dir)

    def stop(self) -> None:
        """SIGTERM what we started (and what it started), then SIGKILL what is left."""
        # Flower detaches some children (superexec, app processes) into sessions of their own,
        # so a process-group signal misses them: collect the whole tree by parent PID first.
        started = self.process_tree()
        tree = started - {proc.pid for proc in self.processes.values()}
        # Their sessions catch what leaves the tree: Ray starts processes while it is being stopped, and
        # its agents (which ignore SIGTERM) outlive their parent, reparented to init.
        sessions = {stat[1] for stat in map(process_stat, started) if stat is not None} - {os.getsid(0)}
        for proc in self.processes.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        signal_pids(tree, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        while tree and time.monotonic() < deadline:
            tree = {pid for pid in tree if Path(f"/proc/{pid}").exists()}
            time.sleep(0.2)
        signal_pids(tree, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (strays := session_members(sessions)) and time.monotonic() < deadline:
            signal_pids(strays, signal.SIGKILL)
            time.sleep(0.1)
        started |= strays
        self.processes.clear()
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        self.stopped = started
        self.leftovers = {pid for pid in started if is_running(pid)}
        if self.leftovers:
            log.warning("processes still running after the federation stopped: %s", sorted(self.leftovers))

    # ------------------------------------------------------------------ running the app
    def run(self, run_config: dict[str, Any], timeout: float = 1800, app_dir: Path = PROJECT_DIR) -> Path:
        """``flwr run`` the OSCAR app with these overrides and wait; returns the run's report.json.

        ``run_config`` must hold ``run-dir`` (absolute) and ``run-name``: that is where the report lands.
        """
        submission = self.submit(run_config, app_dir)
        try:
            return self.wait(submission, timeout)
        finally:
            self.cancel(submission)

    def submit(self, run_config: dict[str, Any], app_dir: Path = PROJECT_DIR) -> "Submission":
        """Start ``flwr run --stream`` for this run config and return at once.

        ``app_dir``: the Flower app project to run (the OSCAR app unless a test brings its own)."""
        name = run_config["run-name"]
        if app_dir == PROJECT_DIR:  # OSCAR's own app: name every bad key before Flower answers "code 15"
            problems = run_config_problems(run_config)
            if problems:
                raise ValueError("run config refused before submission:\n  - " + "\n  - ".join(problems))
        overrides = self.workdir / f"{name}.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        command = [venv_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(overrides)]
        if self.simulation_supernodes:
            options = {"num-supernodes": self.simulation_supernodes, **self.simulation_config}
            command += ["--federation-config", " ".join(f"{k}={v}" for k, v in options.items())]
        self._submissions += 1
        log_path = self.logs_dir / f"flwr-run-{name}-{self._submissions}.log"
        log.info("$ %s", " ".join(command))
        proc = subprocess.Popen(command, env=self.env, cwd=PROJECT_DIR, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.processes[f"flwr-run-{name}"] = proc
        pump = threading.Thread(target=self._pump, args=(proc, log_path), daemon=True)
        pump.start()
        report = Path(run_config["run-dir"]) / name / "report.json"
        return Submission(name=name, proc=proc, pump=pump, report=report, log_path=log_path)

    def wait(self, submission: "Submission", timeout: float) -> Path:
        """Until the run's report is final and the ServerApp is done (its stream has ended).

        report.json is written last, after every artefact; the ServerApp logs its status line after it, so
        the stream (``flwr run --stream`` follows the run to its end) is given a moment to finish too.
        """
        deadline = time.monotonic() + timeout
        while not _finished(submission.report):
            self._check_alive()
            if submission.proc.poll() is not None:
                time.sleep(2)  # the stream may end a moment before the report is renamed into place
                if not _finished(submission.report):
                    raise RuntimeError(f"flwr run exited ({submission.proc.returncode}) without a finished "
                                       f"report at {submission.report}; see {submission.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run did not finish within {timeout:.0f}s; see {submission.log_path}")
            time.sleep(0.5)
        try:
            submission.proc.wait(timeout=max(5.0, min(60.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.warning("the log stream of run %s did not end within a minute of its report", submission.name)
        submission.pump.join(timeout=5)
        return submission.report

    def cancel(self, submission: "Submission") -> None:
        """Stop following the run's logs (the run itself lives in the SuperLink)."""
        _signal_group(submission.proc, signal.SIGTERM)
        submission.proc.wait(timeout=10)
        submission.pump.join(timeout=5)
        self.processes.pop(f"flwr-run-{submission.name}", None)

    def wait_for_supernodes(self, timeout: float = 120) -> None:
        """Until every SuperNode has registered with the SuperLink (its log shows its node id)."""
        deadline = time.monotonic() + timeout
        for client in self.clients:
            log_path = self.logs_dir / f"supernode-{client.name}.log"
            while "SuperNode ID:" not in log_path.read_text(errors="replace"):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"supernode {client.name} did not connect within {timeout:.0f}s; "
                                       f"see {log_path}")
                time.sleep(0.2)

    def process_tree(self) -> set[int]:
        """Every PID this federation started, with everything those started in turn."""
        started = list(self.processes.values())  # a snapshot: `flwr run` may add a process meanwhile (other thread)
        return {pid for proc in started for pid in {proc.pid, *descendants(proc.pid)}}

    def server_app_pids(self) -> list[int]:
        """PIDs of the ServerApp processes the SuperLink started (to simulate a server crash)."""
        return [pid for pid in descendants(self.processes["superlink"].pid) if _runs(pid, b"flwr-serverapp")]

    def client_app_pids(self, client: str) -> list[int]:
        """PIDs of the ClientApp processes a client's SuperNode started: it has received a message."""
        return [pid for pid in descendants(self.processes[f"supernode-{client}"].pid) if _runs(pid, b"flwr-clientapp")]

    def _pump(self, proc: subprocess.Popen, log_path: Path) -> None:
        assert proc.stdout is not None
        with open(log_path, "w") as log_file:
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                if self.stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()

    # ------------------------------------------------------------------ internals
    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        connection = {"address": f"127.0.0.1:{self.superlink_port}", "insecure": True}
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def supernode_env(self) -> dict[str, str]:
        """The SuperNodes' environment (their ClientApps inherit it): the cores shared out between the clients.

        All the clients caption at once, each in its own process with as many intra-op threads as the
        machine has cores by default; on 2 cores three such clients captioned 10x slower than with one
        thread each (OpenMP threads spinning against each other). A thread setting given by the caller wins.
        """
        threads = str(client_threads(os.cpu_count() or 1, len(self.clients)))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                **{k: v for k, v in self.env.items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log_file = open(self.logs_dir / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen(command, env={**self.env, **(env or {})}, cwd=self.workdir,
                                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()  # the child keeps its own descriptor

    def _wait_for_port(self, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{name} did not open 127.0.0.1:{port} within {timeout:.0f}s; see {self.logs_dir}")

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if not name.startswith("flwr-run") and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.logs_dir / (name + '.log')}")


@dataclass
class Submission:
    name: str
    proc: subprocess.Popen
    pump: threading.Thread
    report: Path
    log_path: Path


def wait_until(condition: Callable[[], bool], what: str, timeout: float, poll: float = 0.05) -> None:
    """Poll ``condition`` until it holds; ``TimeoutError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def is_running(pid: int) -> bool:
    """Alive and not a zombie (Linux /proc)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def _runs(pid: int, program: bytes) -> bool:
    try:
        return program in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _finished(report: Path) -> bool:
    import json

    try:
        return json.loads(report.read_text()).get("status") in ("completed", "partial", "failed")
    except (OSError, ValueError):
        return False  # being replaced right now; look again at the next line


def descendants(root: int) -> set[int]:
    """PIDs of every live descendant of ``root`` (Linux /proc), whatever session they moved to."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := process_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session: our PID, our children
    except ProcessLookupError:
        pass
