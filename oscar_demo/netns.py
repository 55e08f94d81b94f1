"""Separate hosts on one machine: a TLS + SuperNode-authenticated federation in Linux network namespaces.

Read as a recipe for real machines, each step is what a person does on each host::

    # the "server" host (namespace <prefix>-link, 10.213.77.1), once:
    oscar-certs --out certs --ip 10.213.77.1 --supernode plain --supernode textured
    oscar-superlink --certs certs --workdir server                       # TLS + --enable-supernode-auth
    flwr supernode register certs/supernodes/plain.pub oscar              # one per client key
    # each client host (namespace <prefix>-<i>, 10.213.77.11, .12, ...), with ca.crt and its own key:
    oscar-supernode --superlink 10.213.77.1:8000 --root-certificates ca.crt \\
        --auth-key plain.key --data-dir /data/plain --output-dir /data/out --model-cache /models/hf
    # then, from the server host:
    flwr run . oscar --stream          # connection "oscar": address 10.213.77.1:8000, root-certificates

Hosts: ``ip netns add`` per host; the server namespace holds a bridge, every other host a veth whose
peer is attached to it. All addresses live in ``SUBNET``, a private /24 that exists only inside these
namespaces (nothing is added to, or addressed in, the machine's own network). Needs root.

``python -m oscar_demo.netns --workdir DIR`` runs the offline demo this way.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from oscar_common.logs import setup_logging
from oscar_demo.demo import demo_run_config, prepare
from oscar_demo.federation import CONNECTION, PROJECT_DIR, ClientSpec, LocalFederation, signal_pids
from oscar_demo.watchdog import Watchdog
from oscar_deploy.launch import venv_bin
from oscar_deploy import certs
from oscar_deploy.launch import SUPERLINK_PORT, connection_config

log = logging.getLogger("oscar.netns")
SUBNET = ipaddress.ip_network("10.213.77.0/24")
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def namespaces_available() -> str | None:
    """``None`` when network namespaces can be made here, otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"oscar-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, FileNotFoundError) as err:
        return f"cannot create a network namespace: {err}"
    _ip("netns", "del", probe)
    return None


class Hosts:
    """``with Hosts(["a", "b"]) as hosts:`` a server namespace and one namespace per named host.

    ``hosts.server_ip`` / ``hosts.ip[name]`` are their addresses; ``hosts.exec_prefix(name)`` runs a
    command on a host. Leaving the block deletes every namespace (with its veths and bridge).
    """

    def __init__(self, names: list[str], subnet: ipaddress.IPv4Network = SUBNET, prefix: str = "") -> None:
        self.prefix = prefix or f"oscar{os.getpid()}"
        self.subnet = subnet
        addresses = list(subnet.hosts())
        self.server_ns = f"{self.prefix}-link"
        self.server_ip = str(addresses[0])
        self.ns = {name: f"{self.prefix}-{i}" for i, name in enumerate(names)}
        self.ip = {name: str(addresses[10 + i]) for i, name in enumerate(names)}
        self.created: list[str] = []

    def __enter__(self) -> "Hosts":
        # If this process is killed, the watchdog deletes the namespaces (nothing is marked with this id).
        self.watchdog = Watchdog(f"netns-{self.prefix}", netns_prefix=self.prefix)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        cidr = f"/{self.subnet.prefixlen}"
        self._add_namespace(self.server_ns)
        _ip("-n", self.server_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.server_ns, "addr", "add", self.server_ip + cidr, "dev", "br0")
        _ip("-n", self.server_ns, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(self.ns.items()):
            self._add_namespace(ns)
            # Both ends are born inside namespaces: the machine's own network never sees them.
            _ip("-n", self.server_ns, "link", "add", f"vh{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.server_ns, "link", "set", f"vh{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", self.ip[name] + cidr, "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        log.info("hosts: server %s (%s), %s", self.server_ns, self.server_ip,
                 ", ".join(f"{n} {self.ns[n]} ({self.ip[n]})" for n in self.ns))

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")  # each host's own 127.0.0.1 (local Runtime APIs)

    def kill_all(self, name: str) -> None:
        """SIGKILL every process on host ``name``: only what we started can live in our namespace."""
        self._kill_namespace(self.ns[name])

    def _kill_namespace(self, ns: str) -> None:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        signal_pids({int(pid) for pid in pids}, signal.SIGKILL)

    def close(self) -> None:
        for ns in reversed(self.created):
            self._kill_namespace(ns)  # normally empty: the federation stops its processes first
            try:
                _ip("netns", "del", ns)
            except RuntimeError as err:
                log.warning("%s", err)
        self.created.clear()
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
            self.watchdog = None

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name]]


class _ServerNamespace:
    """Moves the calling thread (and every process it starts) into the server's namespace, and back."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = -1

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {self.ns}")

    def __enter__(self) -> None:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        try:
            self._setns(target)
        finally:
            os.close(target)

    def __exit__(self, *exc: object) -> None:
        try:
            self._setns(self._home)
        finally:
            os.close(self._home)


class NetnsFederation(LocalFederation):
    """The OSCAR federation on ``Hosts``: TLS on, SuperNodes authenticated by registered keys.

    The SuperLink, ``flwr`` and the ServerApp run in the server namespace, which the calling thread
    enters for the lifetime of the federation, so the inherited ``run``/``stop`` work unchanged;
    each SuperNode runs on its own host through ``oscar-supernode``. ``guests`` get a host and a key
    pair that is never registered, and are not started: the SuperLink must refuse them.
    """

    def __init__(self, workdir: Path, hosts: Hosts, clients: list[ClientSpec], model_cache: Path,
                 guests: Sequence[ClientSpec] = (), stream: bool = False) -> None:
        # The processes run this checkout's launchers (python -m oscar_deploy.launch).
        super().__init__(workdir, clients, env={"PYTHONPATH": str(PROJECT_DIR)}, stream=stream)
        self.hosts = hosts
        self.model_cache = model_cache
        self.guests = list(guests)
        self.certs_dir = self.workdir / "certs"
        self.superlink_port = SUPERLINK_PORT  # the server host's own port space
        self.superlink = f"{hosts.server_ip}:{SUPERLINK_PORT}"
        self._in_server = _ServerNamespace(hosts.server_ns)

    def __enter__(self) -> "NetnsFederation":
        self._in_server.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._in_server.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._in_server.__exit__()

    def start(self) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.certs_dir, ignore_errors=True)  # a fresh CA per federation: oscar-certs never overwrites
        certs.make_all(self.certs_dir, [], [self.hosts.server_ip], [c.name for c in self.clients + self.guests])
        self._write_connection()
        self._spawn("superlink", [*self._launch("superlink"), "--certs", str(self.certs_dir),
                                  "--workdir", str(self.workdir / "server"), "--model-cache", str(self.model_cache)])
        self._wait_for_port(self.superlink_port, "superlink")
        for client in self.clients:
            self.register(self.certs_dir / certs.SUPERNODES_DIR / f"{client.name}.pub")
            self._spawn(f"supernode-{client.name}", self.supernode_command(client))
        log.info("federation up: superlink on %s (TLS, node auth), supernodes %s", self.superlink,
                 ", ".join(f"{c.name}@{self.hosts.ip[c.name]}" for c in self.clients))

    def supernode_command(self, client: ClientSpec) -> list[str]:
        """``oscar-supernode`` on the client's own host, with its key and the federation's CA."""
        return [*self.hosts.exec_prefix(client.name), *self._launch("supernode"),
                "--superlink", self.superlink, "--root-certificates", str(self.certs_dir / certs.CA_CERT),
                "--auth-key", str(self.certs_dir / certs.SUPERNODES_DIR / f"{client.name}.key"),
                "--data-dir", str(client.data_dir), "--name", client.name,
                "--output-dir", str(self.workdir / "client-output" / client.name),
                "--model-cache", str(self.model_cache)]

    def register(self, public_key: Path) -> None:
        result = subprocess.run([venv_bin("flwr"), "supernode", "register", str(public_key), CONNECTION],
                                env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{result.stdout}{result.stderr}")

    def attempt(self, name: str, command: list[str], seconds: float) -> tuple[int | None, str]:
        """Run ``command`` on host ``name`` for at most ``seconds``; (exit code, None if it was still
        running, and its output). For nodes that must not get in: every process left on that host
        (Flower detaches some) is killed before returning."""
        log_path = self.logs_dir / f"attempt-{name}-{len(list(self.logs_dir.glob(f'attempt-{name}-*')))}.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen([*self.hosts.exec_prefix(name), *command], env=self.env, cwd=self.workdir,
                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            code = None
        self.hosts.kill_all(name)
        proc.wait()
        return code, log_path.read_text()

    def _launch(self, role: str) -> list[str]:
        return [sys.executable, "-m", "oscar_deploy.launch", role]

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        connection = connection_config(self.superlink, self.certs_dir / certs.CA_CERT)
        (self.flwr_home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("demo-netns"))
    parser.add_argument("--per-class", type=int, default=10)
    args = parser.parse_args(argv)
    setup_logging()
    if reason := namespaces_available():
        print(f"cannot build test hosts: {reason}", file=sys.stderr)
        return 2
    workdir = args.workdir.resolve()
    clients, env = prepare(workdir, args.per_class)
    specs = [ClientSpec(name, path) for name, path in clients.items()]
    run_config: dict[str, Any] = demo_run_config(workdir / "runs", "netns")
    with Hosts([c.name for c in specs]) as hosts, \
            NetnsFederation(workdir, hosts, specs, Path(env["HF_HUB_CACHE"]), stream=True) as federation:
        report = federation.run(run_config)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
