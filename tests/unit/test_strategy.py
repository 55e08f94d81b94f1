"""The one-shot strategy's rules that need no processes: waiting for nodes, min-clients, a failed report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from oscar_common.config import OscarConfig
from oscar_common.wire import ClientPayload
from oscar_server.report import build_report
from oscar_server.run_dir import RunDirectory
from oscar_server.strategy import ClientRecord, NotEnoughClientsError, OscarStrategy


class NodesOnlyGrid:
    """Just enough of a Flower Grid for the waiting logic: a fixed set of connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture
def strategy(tmp_path: Path, tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> OscarStrategy:
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OscarConfig(class_names=("cat", "dog"), min_clients=3, wait_for_clients_timeout=0.5,
                      run_dir=str(tmp_path), run_name="unit")
    return OscarStrategy(cfg, RunDirectory.for_run(cfg, 1))


def test_waiting_for_nodes_times_out_instead_of_hanging(strategy: OscarStrategy) -> None:
    started = time.monotonic()
    with pytest.raises(NotEnoughClientsError, match="only 2 of min-clients=3 nodes connected"):
        strategy._wait_for_nodes(NodesOnlyGrid([1, 2]))
    assert time.monotonic() - started < 5
    assert strategy._wait_for_nodes(NodesOnlyGrid([3, 1, 2])) == [1, 2, 3]


def test_too_few_valid_uploads_fail_the_run_before_any_synthesis(strategy: OscarStrategy) -> None:
    payload = ClientPayload(class_ids=np.array([0]), counts=np.array([1]), means=np.ones((1, 512), np.float32),
                            scheme="pooled", encoder_id=strategy.cfg.text_encoder, client_name="only")
    strategy.state.clients[7] = ClientRecord(node_id=7, payload=payload, upload_bytes=2048)
    strategy.state.rejected.append({"node_id": 8, "name": "evil", "reason": "invalid payload: means contain NaN or Inf"})
    with pytest.raises(NotEnoughClientsError, match="1 valid uploads, min-clients is 3"):
        strategy.aggregate_train(1, [])
    assert strategy.state.synthesis is None

    report = build_report(strategy.cfg, strategy.state, "failed", "NotEnoughClientsError: ...")
    assert report["status"] == "failed" and report["error"].startswith("NotEnoughClientsError")
    assert report["rejected"] == [{"node_id": 8, "name": "evil", "reason": "invalid payload: means contain NaN or Inf"}]
    assert report["clients"][0]["name"] == "only" and report["clients"][0]["test_accuracy"] is None


def test_an_empty_class_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class-names is empty"):
        OscarStrategy(OscarConfig(run_dir=str(tmp_path)), RunDirectory(tmp_path))
