"""Two ``oscar-supernode`` started at once on one host, as a script's ``for n in a b; do ... & done`` starts
them: each takes its own local port and both stay up (they once both took 9094 and the second died with
"address already in use").
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from oscar_demo.federation import ClientSpec, LocalFederation
from oscar_deploy.launch import venv_bin

pytestmark = pytest.mark.e2e


def _runtime_port(log: Path) -> int:
    """The port oscar-supernode handed to flower-supernode (it prints the command before exec)."""
    return int(re.search(r"^\$ .*flower-supernode .*--port (\d+)", log.read_text(), re.MULTILINE).group(1))


def test_two_supernodes_launched_at_once_take_two_ports(tmp_path: Path) -> None:
    names = ("a", "b")
    with LocalFederation(tmp_path, [], stream=False) as federation:  # a SuperLink for them to join
        for name in names:  # both started before either has chosen its port
            (tmp_path / name).mkdir()
            federation._spawn(f"supernode-{name}", [
                venv_bin("oscar-supernode"), "--superlink", f"127.0.0.1:{federation.superlink_port}", "--insecure",
                "--no-auth", "--data-dir", str(tmp_path / name)])
        federation.clients = [ClientSpec(name, tmp_path / name) for name in names]
        federation.wait_for_supernodes(timeout=120)  # fails at once if either exits
        ports = [_runtime_port(federation.logs_dir / f"supernode-{name}.log") for name in names]
        assert len(set(ports)) == 2, f"both chose port {ports[0]}"
        time.sleep(2)  # the loser of a shared port exits once it tries to bind
        for port in ports:  # each flower-supernode listens on its own
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        for name in names:
            proc = federation.processes[f"supernode-{name}"]
            assert proc.poll() is None, f"supernode {name} exited ({proc.returncode}); see its log"
    assert not federation.leftovers
