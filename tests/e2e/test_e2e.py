"""End to end with real processes: a SuperLink and SuperNodes on 127.0.0.1, the app run by `flwr run`.

Tiny random models (so accuracy is meaningless): these runs check the plumbing and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from oscar_demo.demo import demo_run_config
from oscar_demo.federation import ClientSpec, LocalFederation
from e2e_support import FAST, hub_env

pytestmark = pytest.mark.e2e
# Flower's message framing around the means (record names, metadata, object headers): measured ~1 KB.
PAYLOAD_OVERHEAD = 2048


def _run(tmp_path: Path, tiny_hub: Path, clients: list[ClientSpec], **overrides) -> dict:
    run_config = demo_run_config(tmp_path / "runs", "e2e", **{**FAST, **overrides})
    with LocalFederation(tmp_path, clients, env=hub_env(tiny_hub), stream=False) as federation:
        report_path = federation.run(run_config, timeout=900)
    # superlink, supernodes and what Flower started under them, all gone
    assert len(federation.stopped) > len(clients) + 1 and not federation.leftovers
    report = json.loads(report_path.read_text())
    assert report["status"] == "completed", report["error"]
    return report


def test_pooled_run_with_a_broken_client(tmp_path: Path, tiny_hub: Path, demo_clients: dict[str, Path]) -> None:
    clients = [ClientSpec(name, path) for name, path in sorted(demo_clients.items())[:2]]
    # A third SuperNode whose data dir does not exist: its error is reported, the others proceed.
    clients.append(ClientSpec("broken", tmp_path / "no-such-dir"))
    report = _run(tmp_path, tiny_hub, clients, scheme="pooled")
    run_dir = tmp_path / "runs" / "e2e"

    good = {c["name"]: c for c in report["clients"]}
    assert sorted(good) == sorted(name for name, _ in sorted(demo_clients.items())[:2])
    assert len(report["rejected"]) == 1 and "no-such-dir" in report["rejected"][0]["reason"]
    for client in good.values():
        k = len(client["classes_uploaded"])
        assert k == 10
        assert client["payload_shape"] == [k, 512]
        means_bytes = k * 512 * 4
        assert means_bytes <= client["upload_bytes"] <= 1.1 * means_bytes + PAYLOAD_OVERHEAD
        assert client["test_accuracy"] is not None and 0.0 <= client["test_accuracy"] <= 1.0
        assert client["num_test"] > 0
        # the client kept the broadcast weights, as safetensors
        weights = tmp_path / "client-output" / client["name"] / "oscar_resnet18.safetensors"
        with safe_open(str(weights), framework="pt") as handle:
            assert "fc.weight" in set(handle.keys())

    expected_images = sum(len(c["classes_uploaded"]) * FAST["images-per-class"] for c in good.values())
    assert report["synthesis"]["images"] == expected_images
    assert len(list((run_dir / "synthetic").rglob("*.png"))) == expected_images
    assert len(report["synthesis"]["prompts"]) == sum(len(c["classes_uploaded"]) for c in good.values())
    assert json.loads((run_dir / "prompts.json").read_text()) == report["synthesis"]["prompts"]
    assert report["training"]["images"] == expected_images
    assert report["communication"]["upload_bytes_total"] == sum(c["upload_bytes"] for c in good.values())
    assert report["accuracy"]["mean"] is not None
    assert sorted(p.name for p in (run_dir / "payloads").iterdir()) == sorted(f"{n}.safetensors" for n in good)
    assert (run_dir / "samples.png").stat().st_size > 0
    assert "| client |" in (run_dir / "report.md").read_text()


def test_tokens_run(tmp_path: Path, tiny_hub: Path, demo_clients: dict[str, Path]) -> None:
    clients = [ClientSpec(name, path) for name, path in sorted(demo_clients.items())[1:]]
    report = _run(tmp_path, tiny_hub, clients, scheme="tokens")
    for client in report["clients"]:
        k = len(client["classes_uploaded"])
        assert client["payload_shape"][:2] == [k, 77] and len(client["payload_shape"]) == 3
        assert client["test_accuracy"] is not None
    assert report["synthesis"]["scheme"] == "tokens" and report["synthesis"]["prompts"] is None
    expected = sum(len(c["classes_uploaded"]) * FAST["images-per-class"] for c in report["clients"])
    assert len(list((tmp_path / "runs" / "e2e" / "synthetic").rglob("*.png"))) == expected


def test_simulation_engine(tmp_path: Path, tiny_hub: Path, demo_clients: dict[str, Path]) -> None:
    """`flwr run .` on Flower's simulation engine: virtual SuperNode k reads the k-th client folder."""
    data_root = next(iter(demo_clients.values())).parent
    with LocalFederation(tmp_path, [], env=hub_env(tiny_hub), stream=False, simulation_supernodes=3) as federation:
        run_config = demo_run_config(tmp_path / "runs", "sim",
                                     **{**FAST, "min-clients": 3, "simulation-data-dir": str(data_root)})
        report_path = federation.run(run_config, timeout=900)
    report = json.loads(report_path.read_text())
    assert report["status"] == "completed", report["error"]
    assert sorted(c["name"] for c in report["clients"]) == sorted(demo_clients)
    assert all(c["test_accuracy"] is not None for c in report["clients"])


def test_benchmark_clients(tmp_path: Path, tiny_hub: Path, demo_clients: dict[str, Path]) -> None:
    """The demo's domains read as the `domains` benchmark, chosen by each SuperNode's node config;
    train-shots and test-shots bound what each client uses (simulation's mapping: test_benchmarks.py)."""
    data_root = next(iter(demo_clients.values())).parent
    domains = sorted(demo_clients)[:2]
    clients = [ClientSpec(d, tmp_path / "unused", {"benchmark": "domains", "benchmark-root": str(data_root),
                                                   "client": d, "test-shots": 1}) for d in domains]
    report = _run(tmp_path, tiny_hub, clients, **{"train-shots": 3})
    assert sorted(c["name"] for c in report["clients"]) == domains
    assert all(c["num_images"] == 3 * 10 and c["num_test"] == 10 for c in report["clients"])
