"""docker/compose.yml run for real: docker/Dockerfile built, the federation run to a completed report from
the built image, with client 2 joining from "another machine" (a compose project of its own that has only the
server's ca.crt and its own key), and everything taken down, also when the run is killed.

Root only (a private dockerd); without root or the system packages the tests skip and say why. The base image,
the image's torch and dependency layers and the wheels are cached between runs (oscar_demo/docker_local.py).
"""

from __future__ import annotations

import fcntl
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from e2e_support import FAST
from oscar_deploy import certs
from oscar_demo.demo import demo_run_config
from oscar_demo.docker_local import (BASE_IMAGE, CACHE, IMAGE, ComposeFederation, PrivateDocker, build_image,
                                     ensure_base_image, readable_by_containers, unavailable)
from oscar_demo.watchdog import marked_processes

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(bool(unavailable()), reason=f"no compose federation here: "
                                                                              f"{unavailable()}")]


def _leftovers(marker: str) -> list[str]:
    """What of a run is still there: its state, its processes, its mounts, its cgroups."""
    found = [f"state dir {CACHE / 'run'}"] if (CACHE / "run").exists() else []
    found += [f"process {pid}" for pid in marked_processes(marker)]
    mountinfo = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mountinfo.splitlines() if f"{CACHE}/" in line.split()[4]]
    with open("/proc/self/cgroup") as handle:
        memory = next(line.split(":")[2].strip() for line in handle if ":memory:" in line)
    found += [f"cgroup {marker}"] if (Path("/sys/fs/cgroup/memory") / memory.lstrip("/") / marker).exists() else []
    return found


def _intruder(federation: ComposeFederation, workdir: Path) -> subprocess.Popen:
    """Client 2's SuperNode with a key of its own making, never registered: the SuperLink must refuse it."""
    forged = workdir / "intruder-certs"
    certs.make_supernode_keys(forged, "client-2")
    (forged / "ca.crt").write_bytes((federation.client_certs / "ca.crt").read_bytes())
    readable_by_containers(forged)
    from oscar_demo.federation import free_port
    env = {**federation.env, "CERTS_DIR": str(forged), "CLIENT2_PORT": str(free_port())}
    command = federation.command(f"{federation.remote}-intruder", "run", "--rm", "--no-deps", "-T",
                                 "supernode-2", client=True)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_compose_federation_from_the_built_image_with_a_client_on_another_machine(
        tmp_path: Path, tiny_hub: Path, demo_clients: dict[str, Path]) -> None:
    run_config = demo_run_config(Path("/state/runs"), "compose", **FAST)
    started = time.monotonic()
    with PrivateDocker(log=tmp_path / "dockerd.log") as docker:
        marker = docker.marker
        build_image(docker, tmp_path / "build.log")
        built = time.monotonic()
        federation = ComposeFederation(docker, tmp_path / "run", tiny_hub,
                                       (demo_clients["plain"], demo_clients["textured"]), run_config)
        federation.up()
        intruder = _intruder(federation, tmp_path)
        code = federation.wait(timeout=900)
        log = (tmp_path / "run" / "compose.log").read_text()
        assert code == 0, log[-6000:]

        # TLS: the SuperLink presents a certificate of the federation's CA, and plain HTTP gets no answer.
        context = ssl.create_default_context(cafile=str(federation.client_certs / "ca.crt"))
        with socket.create_connection(("127.0.0.1", federation.superlink_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with socket.create_connection(("127.0.0.1", federation.superlink_port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.settimeout(10)
            try:
                reply = raw.recv(100)
            except (ConnectionResetError, TimeoutError):
                reply = b""
            assert not reply.startswith(b"HTTP/")
        # Authentication: the node with the unregistered key was refused, and exited.
        output, _ = intruder.communicate(timeout=300)
        federation.compose(f"{federation.remote}-intruder", "down", "--volumes", client=True)
        assert intruder.returncode != 0 and "Failed to activate SuperNode" in output, output[-3000:]

        # Every role ran from the built image: its venv, as its unprivileged user, no checkout mounted.
        for service in ("superlink", "serverapp", "supernode-1", "clientapp-1", "supernode-2", "clientapp-2"):
            info = json.loads(docker.docker("inspect", federation.container(service)))[0]
            assert info["Config"]["Image"] == IMAGE and info["Config"]["User"] == "app", service
            assert not any(m["Source"].startswith(str(Path(__file__).parents[2])) for m in info["Mounts"]), service
        # The SuperLink process itself (the launcher execs it): the image's, the app user's, TLS and auth on.
        pid = json.loads(docker.docker("inspect", federation.container("superlink")))[0]["State"]["Pid"]
        superlink = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        uid = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid == "49999" and superlink[1] == "/opt/venv/bin/flower-superlink", (uid, superlink)
        assert "--ssl-certfile" in superlink and "--enable-supernode-auth" in superlink
        remote = json.loads(docker.docker("inspect", federation.container("supernode-2")))[0]
        assert {m["Destination"]: m["Source"] for m in remote["Mounts"]}["/certs"] == str(federation.client_certs)
        assert sorted(p.name for p in federation.client_certs.rglob("*") if p.is_file()) == ["ca.crt", "client-2.key"]
        assert remote["Config"]["Labels"]["com.docker.compose.project"] == federation.remote

        run_dir, outputs = federation.collect()
        federation.down()
        assert docker.docker("ps", "--all", "--quiet").strip() == ""
        assert docker.docker("volume", "ls", "--quiet").strip() == ""
    seconds = time.monotonic() - started
    assert _leftovers(marker) == []
    print(f"compose test: {seconds:.0f}s, of which build {built - started:.0f}s")

    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed", (report["error"], report["problems"])
    assert [c["name"] for c in report["clients"]] == ["client-1", "client-2"] and report["rejected"] == []
    model = load_file(str(run_dir / "model.safetensors"))
    for client in report["clients"]:
        k = len(client["classes_uploaded"])
        assert k == 10 and client["payload_shape"] == [k, 512] and client["shared_counts"] is None
        assert client["test_accuracy"] is not None and client["num_test"] > 0
        # the model broadcast: each client kept exactly the weights the server trained
        kept = load_file(str(outputs[client["name"]] / "oscar_resnet18.safetensors"))
        assert kept.keys() == model.keys() and all(np.array_equal(kept[k], model[k]) for k in model)
        assert client["download_bytes"] >= sum(v.nbytes for v in model.values())
    # the SuperLink activated the two registered nodes, and no other
    superlink_log = "\n".join(line for line in log.splitlines() if line.startswith("superlink"))
    assert set(re.findall(r"Activated node_id=(\d+)", superlink_log)) == {str(c["node_id"]) for c in report["clients"]}


def test_a_killed_run_leaves_nothing_behind(tmp_path: Path) -> None:
    """SIGKILL the process that started dockerd and a container: the watchdog takes all of it down."""
    with PrivateDocker(log=tmp_path / "dockerd.log") as docker:
        ensure_base_image(docker, tmp_path / "base.log")
    script = ("import sys, time\nfrom pathlib import Path\nfrom oscar_demo.docker_local import PrivateDocker\n"
              f"with PrivateDocker(log=Path({str(tmp_path / 'killed.log')!r})) as d:\n"
              f"    d.docker('run', '--detach', '--network', 'host', {BASE_IMAGE!r}, 'sleep', '4321')\n"
              "    print(d.marker, flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    marker = proc.stdout.readline().strip()
    assert marker.startswith("oscar-docker-"), "the run did not start"
    daemon = marked_processes(marker)
    container = [pid for pid in Path("/proc").iterdir() if pid.name.isdigit()
                 and (pid / "cmdline").exists() and (pid / "cmdline").read_bytes() == b"sleep\x004321\x00"]
    assert daemon and container and _leftovers(marker)  # dockerd, containerd, the shim; the container
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(CACHE / "lock") as lock:  # the watchdog holds the run's lock until it is done
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the watchdog did not finish"
                time.sleep(0.5)
        assert _leftovers(marker) == []
        assert not any(pid.exists() for pid in container)
