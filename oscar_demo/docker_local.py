"""The compose federation of docker/compose.yml on one machine without a registry (run as root).

Used by ``docker/run-local.sh`` and ``tests/e2e/test_compose_federation.py``:

1. a private ``dockerd`` (no bridge, no iptables: it touches nothing on the host's network) on a socket of
   its own, with a watchdog beside it;
2. a base image made from a Debian rootfs (``debootstrap --variant=minbase``, then ``docker import``);
3. ``docker/Dockerfile`` built from it by ``docker-compose build`` (``docker/compose.local.yml``), pip
   reading a wheel mirror served on 127.0.0.1: the wheels the host's pip downloads once;
4. the federation as two compose projects on the host's network (every address 127.0.0.1): the server
   side (certs, superlink, serverapp, control, client 1), and client 2 as on another machine, a project with
   its own volumes that gets only the server's ``ca.crt`` and its own key (``docker/compose.client.yml``).

Kept between runs in ``$OSCAR_DOCKER_CACHE`` (default ``/var/cache/oscar-docker``, never the checkout):
``docker/``, the daemon's data root (the base image, the image's torch and dependency layers: a run
rebuilds only the layer with the code), and ``wheels/``. ``run/`` holds the running daemon's state; one
run at a time (``lock``). Everything a run starts is taken down when it ends, also when it is killed:
dockerd runs in a session of its own, and the watchdog (woken by its parent's death, ``PR_SET_PDEATHSIG``)
removes the containers and volumes, stops dockerd, kills what is left in the daemon's cgroup, and
unmounts what the daemon mounted; a run that finds ``run/`` left over does the same first.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from oscar_demo.watchdog import MARKER_VARIABLE, die_with_parent, kill_marked, serve

PROJECT = Path(__file__).resolve().parents[1]
DOCKER_DIR = PROJECT / "docker"
CACHE = Path(os.environ.get("OSCAR_DOCKER_CACHE", "/var/cache/oscar-docker"))
BASE_IMAGE = "oscar-local-base"
IMAGE = "oscar-flower:local"
# The mirror's URL is a build argument, hence part of the build cache's key: a fixed address keeps the torch
# and dependency layers cached between runs (the port lies below the ephemeral range free ports come from).
WHEELS_ADDRESS = ("127.0.0.1", 28480)
TOOLS = ("dockerd", "docker", "docker-compose", "debootstrap")
SERVER_SERVICES = ("certs", "superlink", "serverapp", "control", "supernode-1", "clientapp-1")
REMOTE_SERVICES = ("supernode-2", "clientapp-2")
LOCAL_FILES = ("compose.yml", "compose.local.yml")


def unavailable() -> str | None:
    """``None`` when this machine can run the compose federation, otherwise why not."""
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (scripts/install-system-packages.sh)"
    return None


def _run(command: list[str], env: dict[str, str] | None = None, timeout: float = 600, **kwargs: Any) -> str:
    """Run a command to its end; its stdout, or an error with the command's own words."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-3000:]}")
    return result.stdout


# ------------------------------------------------------------------------------------------------ teardown
def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point))
    return points


def _cgroup_dirs(name: str) -> list[Path]:
    """The directories called ``name`` in every cgroup hierarchy (the daemon's ``--cgroup-parent``)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] in ("cgroup", "cgroup2"):
            for root, dirs, _ in os.walk(fields[4]):
                if name in dirs:
                    found.append(Path(root) / name)
                    dirs.remove(name)
    return found


def _kill_cgroup(name: str) -> None:
    """SIGKILL every process in the cgroups called ``name``: the containers, whatever became of the daemon."""
    for _ in range(50):
        pids = {int(pid) for directory in _cgroup_dirs(name) for procs in directory.rglob("cgroup.procs")
                for pid in procs.read_text().split()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _dockerd_pid(state: Path) -> int | None:
    """The run's dockerd, if it still runs (a stale pid file may name an unrelated process by now)."""
    try:
        pid = int((state / "dockerd.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"dockerd" in cmdline and str(state).encode() in cmdline else None


def teardown(state: Path, data_root: Path) -> None:
    """Take a run's daemon down with everything under it: containers, volumes, processes, mounts, its
    state directory. Safe to repeat; the data root (the cache) stays."""
    if not state.exists():
        return
    marker = (state / "marker").read_text() if (state / "marker").exists() else ""
    env = {**os.environ, "DOCKER_HOST": f"unix://{state / 'docker.sock'}"}
    pid = _dockerd_pid(state)
    if pid is not None:
        with contextlib.suppress(Exception):  # a daemon that does not answer is stopped all the same
            containers = _run(["docker", "ps", "--all", "--quiet"], env, timeout=30).split()
            if containers:
                _run(["docker", "rm", "--force", "--volumes", *containers], env, timeout=120)
            volumes = _run(["docker", "volume", "ls", "--quiet"], env, timeout=30).split()
            if volumes:
                _run(["docker", "volume", "rm", "--force", *volumes], env, timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _dockerd_pid(state) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    if marker:
        kill_marked(marker)  # dockerd, containerd, the shims, a docker-compose that was still following logs
        _kill_cgroup(marker)
    # dockerd leaves its network namespace file mounted; a killed one leaves the containers' file systems too
    for point in sorted(_mount_points(), key=len, reverse=True):
        if point.startswith((f"{state}/", f"{data_root}/")):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
    if marker:
        for directory in _cgroup_dirs(marker):
            for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                reverse=True):
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()
    shutil.rmtree(state, ignore_errors=True)


def _watch(state: Path, data_root: Path) -> None:
    """The watchdog: tears the run down when its parent dies; stands down on SIGUSR1."""
    serve(lambda: teardown(state, data_root))


# -------------------------------------------------------------------------------------------------- daemon
class PrivateDocker:
    """``with PrivateDocker() as docker:`` a dockerd of this run's own, on the cache's data root.

    ``docker.env`` is the environment for ``docker`` and ``docker-compose`` (its socket, and the run's
    marker, so that the watchdog finds them too)."""

    def __init__(self, cache: Path = CACHE, log: Path | None = None) -> None:
        self.cache = cache
        self.state = cache / "run"
        self.data_root = cache / "docker"
        self.log = log or cache / "dockerd.log"
        self.marker = f"oscar-docker-{os.getpid()}-{secrets.token_hex(4)}"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.state / 'docker.sock'}",
                    MARKER_VARIABLE: self.marker, "COMPOSE_DOCKER_CLI_BUILD": "0", "DOCKER_BUILDKIT": "0"}
        self._dockerd: subprocess.Popen | None = None

    def __enter__(self) -> "PrivateDocker":
        self.cache.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.cache / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for the other run that uses {self.cache}", file=sys.stderr, flush=True)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            teardown(self.state, self.data_root)  # what a killed run left
            self.state.mkdir()
            (self.state / "marker").write_text(self.marker)
            # The watchdog shares the lock: while it takes a dead run down, no new run starts.
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "oscar_demo.docker_local", "--watch", str(self.state), str(self.data_root)],
                preexec_fn=die_with_parent, start_new_session=True, pass_fds=(self._lock.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=PROJECT,
                env={k: v for k, v in self.env.items() if k != MARKER_VARIABLE})
            if self._watchdog.stdout.readline() != b"ready\n":
                raise RuntimeError("the docker watchdog did not start")
            self._start_dockerd()
            self.remove_everything()  # containers and volumes a killed run left in the data root
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_dockerd(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # Its own session: a Ctrl-C or a kill of the caller's process group leaves it to the teardown.
            proc = subprocess.Popen(
                ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false",
                 "--host", self.env["DOCKER_HOST"], "--data-root", str(self.data_root),
                 "--exec-root", str(self.state / "exec"), "--pidfile", str(self.state / "dockerd.pid"),
                 # relative: the containers' cgroups lie under the caller's, and teardown finds them by name
                 "--cgroup-parent", self.marker],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._dockerd = proc
        deadline = time.monotonic() + 90
        while subprocess.run(["docker", "version"], env=self.env, capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start; its log: {self.log}\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        teardown(self.state, self.data_root)
        if self._dockerd is not None:
            self._dockerd.wait(timeout=30)  # stopped by the teardown: reap it
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:
            if watchdog.poll() is None:
                watchdog.send_signal(signal.SIGUSR1)
            watchdog.wait(timeout=30)
            watchdog.stdout.close()
        self._lock.close()

    def docker(self, *args: str, timeout: float = 600) -> str:
        return _run(["docker", *args], self.env, timeout=timeout)

    def remove_everything(self) -> None:
        containers = self.docker("ps", "--all", "--quiet").split()
        if containers:
            self.docker("rm", "--force", "--volumes", *containers)
        volumes = self.docker("volume", "ls", "--quiet").split()
        if volumes:
            self.docker("volume", "rm", "--force", *volumes)


# -------------------------------------------------------------------------------------------------- images
def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 sources first, then sources.list)."""
    for path, pattern in ((Path("/etc/apt/sources.list.d/debian.sources"), r"^URIs:\s*(\S+)"),
                          (Path("/etc/apt/sources.list"), r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)")):
        if path.exists() and (match := re.search(pattern, path.read_text(), re.MULTILINE)):
            return match.group(1)
    raise RuntimeError("no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list")


def ensure_base_image(docker: PrivateDocker, log: Path) -> bool:
    """The base image (Debian's python3 and venv, CA certificates) in the daemon; True if it was made now."""
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], env=docker.env,
                      capture_output=True).returncode == 0:
        return False
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    suite = release.get("VERSION_CODENAME", "bookworm").strip('"')
    rootfs = docker.state / "rootfs"  # in the run's state: a killed run's half-made one goes with it
    with open(log, "ab") as out:
        # docker.env: the run's marker, so that the watchdog stops a debootstrap whose starter was killed
        result = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                                 suite, str(rootfs), debian_mirror()], stdout=out, stderr=subprocess.STDOUT,
                                env=docker.env, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap failed; its log: {log}\n" + log.read_text(errors="replace")[-2000:])
    # The wheels are the host's Python's: the image's must be the same version.
    image_python = next((p.name.removeprefix("python") for p in sorted((rootfs / "usr/bin").glob("python3.*"))
                         if re.fullmatch(r"python3\.\d+", p.name)), "none")
    host_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if image_python != host_python:
        shutil.rmtree(rootfs)
        raise RuntimeError(f"Debian {suite} has Python {image_python}, this venv {host_python}: the wheels "
                           "the host's pip downloads would not fit the image")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE, env=docker.env)
    subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=docker.env, check=True,
                   capture_output=True, timeout=600)
    tar.stdout.close()
    tar.wait()
    shutil.rmtree(rootfs)
    return True


def image_requirements() -> list[str]:
    """What the Dockerfile's pip steps install: its torch, the project's dependencies with the demo extra, and
    the build backend that installs the project itself."""
    dockerfile = (DOCKER_DIR / "Dockerfile").read_text()
    torch = re.search(r'^ARG TORCH="([^"]+)"', dockerfile, re.MULTILINE).group(1).split()
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    return [*torch, *project["project"]["dependencies"], *project["project"]["optional-dependencies"]["demo"],
            *project["build-system"]["requires"]]


def ensure_wheels(cache: Path = CACHE, env: dict[str, str] | None = None) -> Path:
    """``cache/wheels``: every wheel the image needs, downloaded by this host's pip (its indexes, its
    cache); skipped while the requirements are those of the last download."""
    wheels = cache / "wheels"
    requirements = image_requirements()
    stamp = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()
    if (wheels / ".requirements").exists() and (wheels / ".requirements").read_text() == stamp:
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheels),
          *requirements], env, timeout=1800)
    (wheels / ".requirements").write_text(stamp)
    return wheels


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_wheels(wheels: Path) -> Iterator[str]:
    """A directory listing of ``wheels`` on 127.0.0.1 (pip's ``--find-links``), for as long as the block runs."""
    handler = partial(_QuietHandler, directory=str(wheels))
    try:
        server = http.server.ThreadingHTTPServer(WHEELS_ADDRESS, handler)
    except OSError:  # the fixed port is taken: this build misses the cache, and is still right
        server = http.server.ThreadingHTTPServer((WHEELS_ADDRESS[0], 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{WHEELS_ADDRESS[0]}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def compose_env(**variables: str) -> dict[str, str]:
    """The variables docker/compose.local.yml needs, with the image's name."""
    return {"OSCAR_IMAGE": IMAGE, "BASE_IMAGE": BASE_IMAGE,
            "PIP_FIND_LINKS": f"http://{WHEELS_ADDRESS[0]}:{WHEELS_ADDRESS[1]}/", **variables}


def build_image(docker: PrivateDocker, log: Path) -> None:
    """docker/Dockerfile, built the way docker/compose.yml (+ compose.local.yml) builds it."""
    ensure_base_image(docker, log)
    wheels = ensure_wheels(docker.cache, docker.env)
    with serve_wheels(wheels) as url:
        with open(log, "ab") as out:
            result = subprocess.run(["docker-compose", "--project-name", "oscar-build",
                                     *(arg for name in LOCAL_FILES for arg in ("-f", str(DOCKER_DIR / name))),
                                     "build", "certs"], env={**docker.env, **compose_env(PIP_FIND_LINKS=url)},
                                    stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"the image did not build; its log: {log}\n" + log.read_text(errors="replace")[-3000:])
    docker.docker("image", "prune", "--force")  # the code layers of earlier builds


# ---------------------------------------------------------------------------------------------- federation
def readable_by_containers(path: Path) -> None:
    """The image's processes run as an unprivileged user: mounted folders must be world-readable."""
    for item in [path, *path.rglob("*")]:
        mode = item.stat().st_mode
        item.chmod(mode | 0o044 | (0o011 if item.is_dir() else 0))


class ComposeFederation:
    """docker/compose.yml as two projects on this host's network: the server side with client 1, and
    client 2 as on another machine (``docker/compose.client.yml``: its own project and volumes, and only the
    server's ``ca.crt`` and its own key, copied out of the server's ``certs`` volume as an operator would)."""

    def __init__(self, docker: PrivateDocker, work: Path, model_cache: Path, client_data: tuple[Path, Path],
                 run_config: dict[str, Any]) -> None:
        from oscar_demo.federation import free_port
        import tomli_w

        self.docker, self.work = docker, work
        work.mkdir(parents=True, exist_ok=True)
        for path in (model_cache, *client_data):
            readable_by_containers(path)
        self.run_name = run_config["run-name"]
        (work / "run-config.toml").write_text(tomli_w.dumps(run_config))
        suffix = secrets.token_hex(3)
        self.server, self.remote = f"oscar-server-{suffix}", f"oscar-client-2-{suffix}"
        self.superlink_port = free_port()
        self.client_certs = work / "client-2-certs"
        self.env = {**docker.env, **compose_env(
            MODEL_CACHE=str(model_cache), CLIENT1_DATA=str(client_data[0]), CLIENT2_DATA=str(client_data[1]),
            RUN_CONFIG=str(work / "run-config.toml"), SUPERLINK_HOST="127.0.0.1", BIND_HOST="127.0.0.1",
            CLIENT1_HOST="127.0.0.1", CLIENT2_HOST="127.0.0.1", SUPERLINK_PORT=str(self.superlink_port),
            CLIENT1_PORT=str(free_port()), CLIENT2_PORT=str(free_port()), CERTS_DIR=str(self.client_certs))}

    @staticmethod
    def command(project: str, *args: str, client: bool = False) -> list[str]:
        """``docker-compose`` on docker/compose.yml + compose.local.yml (+ compose.client.yml: a client's machine)."""
        files = [*LOCAL_FILES, *(("compose.client.yml",) if client else ())]
        return ["docker-compose", "--project-name", project,
                *(arg for name in files for arg in ("-f", str(DOCKER_DIR / name))), *args]

    def compose(self, project: str, *args: str, client: bool = False, timeout: float = 300) -> str:
        return _run(self.command(project, *args, client=client), self.env, timeout=timeout)

    def container(self, service: str, project: str | None = None) -> str:
        project = project or (self.remote if service in REMOTE_SERVICES else self.server)
        return self.compose(project, "ps", "--quiet", service, client=project == self.remote).strip()

    def up(self) -> None:
        self.compose(self.server, "up", "--no-build", "--detach", *SERVER_SERVICES)
        certs = self.container("certs")
        code = self.docker.docker("wait", certs, timeout=300).strip()
        if code != "0":
            raise RuntimeError(f"the certs service exited with {code}: {self.docker.docker('logs', certs)}")
        # What the server's operator hands to client 2's machine: the CA certificate and that client's key.
        (self.client_certs / "supernodes").mkdir(parents=True, exist_ok=True)
        for name in ("ca.crt", "supernodes/client-2.key"):
            self.docker.docker("cp", f"{certs}:/certs/{name}", str(self.client_certs / name))
        readable_by_containers(self.client_certs)
        self.compose(self.remote, "up", "--no-build", "--detach", "--no-deps", *REMOTE_SERVICES, client=True)

    def wait(self, timeout: float) -> int:
        """The ``control`` container's exit status: it ends when the run does."""
        try:
            return int(self.docker.docker("wait", self.container("control"), timeout=timeout))
        finally:
            self.save_logs()

    def save_logs(self) -> Path:
        path = self.work / "compose.log"
        path.write_text(self.compose(self.server, "logs", "--no-color")
                        + self.compose(self.remote, "logs", "--no-color", client=True))
        return path

    def collect(self) -> tuple[Path, dict[str, Path]]:
        """The server's run directory and each client's output, copied out of their volumes."""
        run_dir = self.work / "server-run"
        self.docker.docker("cp", f"{self.container('serverapp')}:/state/runs/{self.run_name}", str(run_dir))
        outputs = {}
        for n in ("1", "2"):
            outputs[f"client-{n}"] = self.work / f"client-{n}-output"
            self.docker.docker("cp", f"{self.container(f'supernode-{n}')}:/output", str(outputs[f"client-{n}"]))
        return run_dir, outputs

    def down(self) -> None:
        self.compose(self.remote, "down", "--volumes", "--timeout", "10", client=True)
        self.compose(self.server, "down", "--volumes", "--timeout", "10")


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, nargs="?", default=Path("/var/tmp/oscar-compose"),
                        help="data, models, logs and the run's results go here")
    parser.add_argument("--watch", nargs=2, type=Path, help=argparse.SUPPRESS)  # the watchdog
    args = parser.parse_args(argv)
    if args.watch:
        _watch(*args.watch)
        return 0
    if reason := unavailable():
        print(f"cannot run the compose federation here: {reason}", file=sys.stderr)
        return 2
    from oscar_demo.demo import demo_run_config, prepare
    from oscar_server.report import client_table

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the with-block
    work = args.workdir.resolve()
    shutil.rmtree(work / "run", ignore_errors=True)
    started = time.monotonic()
    clients, _ = prepare(work, per_class=6)
    run_config = demo_run_config(Path("/state/runs"), "compose", **{
        "images-per-class": 2, "num-inference-steps": 10, "inversion-steps": 40, "epochs": 1, "min-clients": 2})
    with PrivateDocker(log=work / "dockerd.log") as docker:
        print(f"dockerd up; building {IMAGE} (log: {work / 'build.log'})", flush=True)
        build_image(docker, work / "build.log")
        federation = ComposeFederation(docker, work / "run", work / "hf-cache",
                                       (clients["plain"], clients["textured"]), run_config)
        federation.up()
        code = federation.wait(timeout=1800)
        print(federation.save_logs().read_text())
        run_dir, _ = federation.collect()
        federation.down()
    print(f"control exited with {code} after {time.monotonic() - started:.0f}s; everything is down")
    report = json.loads((run_dir / "report.json").read_text())
    print(f"status: {report['status']}  rejected: {report['rejected']}")
    print(client_table(report))
    return 0 if code == 0 and report["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
