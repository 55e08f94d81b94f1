"""A TLS + authenticated federation whose SuperLink and SuperNodes live in network namespaces of their
own (real links, real addresses): separate hosts on one machine.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from oscar_demo.demo import demo_run_config
from oscar_demo.federation import ClientSpec
from oscar_deploy import launch
from oscar_demo.netns import Hosts, NetnsFederation, namespaces_available
from e2e_support import FAST


# ---------------------------------------------------------------------------------------------- separate hosts
@pytest.mark.e2e
@pytest.mark.skipif(bool(namespaces_available()), reason=f"no test hosts: {namespaces_available()}")
def test_tls_authenticated_federation_on_separate_hosts(tmp_path: Path, tiny_hub: Path,
                                                        demo_clients: dict[str, Path]) -> None:
    """SuperLink on one host, each SuperNode on its own; an insecure and an unregistered node are refused."""
    names = sorted(demo_clients)
    members = [ClientSpec(name, demo_clients[name]) for name in names[:2]]
    intruder = ClientSpec(names[2], demo_clients[names[2]])
    run_config = demo_run_config(tmp_path / "runs", "netns", **FAST)
    with Hosts(names) as hosts:
        prefix = hosts.prefix
        with NetnsFederation(tmp_path, hosts, members, tiny_hub, guests=[intruder]) as federation:
            superlink_log = federation.logs_dir / "superlink.log"
            # The registered nodes run the round while the intruder tries to get in (min-clients is theirs).
            submission = federation.submit(run_config)
            # Plain HTTP against the TLS SuperLink: every attempt fails for as long as it tries.
            code, output = federation.attempt(intruder.name, launch.supernode_command(
                federation.superlink, None, None, {"data-dir": str(intruder.data_dir)}, port=9095), seconds=15)
            assert code is None or code != 0
            assert "Connection attempt failed" in output
            assert f"{hosts.ip[intruder.name]}:" not in superlink_log.read_text()  # not one request got through
            # TLS and a valid key, but the key was never registered: the SuperLink refuses the node.
            code, output = federation.attempt(intruder.name, federation.supernode_command(intruder), seconds=120)
            assert code is not None and code != 0 and "Failed to activate SuperNode" in output, output
            log = superlink_log.read_text()
            assert "No SuperNode found with the given public key" in log
            assert f'{hosts.ip[intruder.name]}:' in log  # the refusal came over the intruder's own link

            report_path = federation.wait(submission, timeout=600)
            federation.cancel(submission)
        # superlink, supernodes and what Flower started under them, all gone
        assert len(federation.stopped) > len(members) + 1 and not federation.leftovers
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout

    report = json.loads(report_path.read_text())
    assert report["status"] == "completed", report["error"]
    assert sorted(c["name"] for c in report["clients"]) == [c.name for c in members]
    assert report["rejected"] == []
    assert all(c["test_accuracy"] is not None for c in report["clients"])
    log = superlink_log.read_text()
    for client in members:  # each registered node was activated over its own host's link
        assert re.search(rf'{re.escape(hosts.ip[client.name])}:\d+ - "POST /v1/fleet/activate-node \S+ 200', log)
        assert (tmp_path / "client-output" / client.name / "oscar_resnet18.safetensors").exists()
