"""The FedAvg baseline as its own Flower app on a real SuperLink and two SuperNodes: 2 rounds, measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oscar_common.data.local import load_client_split
from oscar_common.training.classifier import build_classifier, classifier_from_bytes
from oscar_demo.demo_data import DIGIT_NAMES
from oscar_demo.federation import PROJECT_DIR, ClientSpec, LocalFederation

pytestmark = pytest.mark.e2e
FEDAVG_APP = PROJECT_DIR / "baselines" / "fedavg"


def _state_dict_bytes(num_classes: int) -> int:
    return sum(t.numel() * t.element_size() for t in build_classifier(num_classes).state_dict().values())


def test_fedavg_federation(tmp_path: Path, demo_clients: dict[str, Path]) -> None:
    """`flwr run baselines/fedavg` on a SuperLink and two SuperNodes: 2 rounds, measured, then stopped."""
    rounds = 2
    clients = [ClientSpec(name, path) for name, path in sorted(demo_clients.items())[:2]]
    run_config = {"class-names": ",".join(DIGIT_NAMES), "num-rounds": rounds, "local-epochs": 1,
                  "classifier-image-size": 32, "classifier-pretrained": False, "batch-size": 16,
                  "min-clients": 2, "wait-for-clients-timeout": 120.0, "round-timeout": 300.0,
                  "run-dir": str(tmp_path / "runs"), "run-name": "fedavg"}
    # One thread per process: two clients (and the server) share 2 cores without OpenMP spin-waits.
    with LocalFederation(tmp_path, clients, env={"OMP_NUM_THREADS": "1"}, stream=False) as fed:
        report_path = fed.run(run_config, timeout=600, app_dir=FEDAVG_APP)
    # superlink, supernodes and what Flower started under them, all gone
    assert len(fed.stopped) > len(clients) + 1 and not fed.leftovers

    report = json.loads(report_path.read_text())
    assert report["status"] == "completed", report["error"]
    assert report["method"] == "fedavg" and report["config"]["num-rounds"] == rounds
    model_bytes = _state_dict_bytes(len(DIGIT_NAMES))
    assert report["model"]["state_dict_bytes"] == model_bytes
    by_name = {c["name"]: c for c in report["clients"]}
    assert sorted(by_name) == [c.name for c in clients]
    for spec in clients:
        client = by_name[spec.name]
        train, test = load_client_split(spec.data_dir, DIGIT_NAMES, seed=0)  # OSCAR's split for seed 0
        assert client["num_train"] == len(train) and client["num_test"] == len(test)
        assert client["rounds_trained"] == rounds
        assert 0.0 <= client["test_accuracy"] <= 1.0
        # each round uploads the trained state dict, plus small metric records and framing
        assert rounds * model_bytes <= client["upload_bytes"] <= 1.01 * rounds * model_bytes + 65536
        # each round downloads the global model twice: to train and to evaluate
        assert 2 * rounds * model_bytes <= client["download_bytes"] <= 1.01 * 2 * rounds * model_bytes + 65536
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    for entry in report["rounds"]:
        assert sorted(entry["train"]) == sorted(entry["evaluate"]) == sorted(by_name)
        assert not entry["errors"]
        assert "train-loss" in entry["aggregated_train"] and "accuracy" in entry["aggregated_evaluate"]
    last = report["rounds"][-1]["evaluate"]
    assert all(by_name[name]["test_accuracy"] == last[name]["accuracy"] for name in by_name)
    assert report["communication"]["upload_bytes_total"] == sum(c["upload_bytes"] for c in report["clients"])
    weights = (tmp_path / "runs" / "fedavg" / "model.safetensors").read_bytes()
    classifier_from_bytes(weights, len(DIGIT_NAMES), DIGIT_NAMES)
