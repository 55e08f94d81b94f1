"""Hostile or broken payloads through the real message path: SuperNodes whose ClientApp sends a broken
upload to the real OSCAR ServerApp over the SuperLink. Each is rejected with its reason, in the log
and the report, and the honest clients' run completes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from oscar_demo.demo import demo_run_config
from oscar_demo.federation import PROJECT_DIR, ClientSpec, LocalFederation
from oscar_demo.tiny import offline_hub_env

pytestmark = pytest.mark.e2e

# One case of each family through the real message path; tests/unit/test_wire.py has every rule.
EXPECTED_REASONS = {
    "repetitive-huge": "over the limit of",  # bounded on declared shapes before anything is decoded
    "old-format": "old upload format (version 1",
    "nan": "NaN or Inf",
    "unknown-scheme": "scheme 'pixels'",
    "missing-meta": "missing ConfigRecord 'oscar.upload-meta'",
}


def hostile_app(tmp_path: Path) -> Path:
    """The OSCAR app with its ClientApp swapped for tests/e2e/hostile_client.py (same run config)."""
    app_dir = tmp_path / "hostile-app"
    app_dir.mkdir()
    shutil.copy(Path(__file__).with_name("hostile_client.py"), app_dir / "hostile_client.py")
    pyproject = (PROJECT_DIR / "pyproject.toml").read_text()
    pyproject, swapped = re.subn(r'clientapp = "[^"]+"', 'clientapp = "hostile_client:app"', pyproject)
    assert swapped == 1
    (app_dir / "pyproject.toml").write_text(pyproject)
    return app_dir


def test_every_broken_payload_is_rejected_and_the_others_proceed(tmp_path: Path, tiny_hub: Path,
                                                                 demo_clients: dict[str, Path]) -> None:
    honest = sorted(demo_clients)[:1]
    clients = [ClientSpec(n, demo_clients[n], {"corruption": "none"}) for n in honest]
    # A hostile node needs no data: its payload is made up. The data dir is only its name's source.
    clients += [ClientSpec(kind, tmp_path / kind, {"corruption": kind}) for kind in EXPECTED_REASONS]
    run_config = demo_run_config(tmp_path / "runs", "hostile", **{
        "images-per-class": 1, "num-inference-steps": 4, "inversion-steps": 10, "epochs": 1,
        "min-clients": 1, "min-images-per-class": 2})
    env = offline_hub_env(tiny_hub)
    with LocalFederation(tmp_path, clients, env=env, stream=False) as federation:
        federation.wait_for_supernodes()  # min-clients is 1: every node must be there when the round starts
        report = json.loads(federation.run(run_config, timeout=900, app_dir=hostile_app(tmp_path)).read_text())

    assert report["status"] == "partial", report["error"]  # partial: the hostile nodes are listed as problems
    assert sorted(c["name"] for c in report["clients"]) == honest
    assert all(c["test_accuracy"] is not None for c in report["clients"])
    reasons = [r["reason"] for r in report["rejected"]]
    assert len(reasons) == len(EXPECTED_REASONS), reasons
    for kind, expected in EXPECTED_REASONS.items():
        matching = [r for r in reasons if expected in r]
        assert matching, f"{kind}: no rejection mentions {expected!r}; got {reasons}"
    named = {r["name"]: r["reason"] for r in report["rejected"] if r["name"]}
    assert EXPECTED_REASONS["nan"] in named["nan"]  # the report names who sent what
    server_log = "".join(p.read_text() for p in (tmp_path / "logs").glob("flwr-run-*.log"))
    assert server_log.count("rejected node") >= len(EXPECTED_REASONS)
