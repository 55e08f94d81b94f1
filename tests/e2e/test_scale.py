"""Ten virtual clients on Flower's simulation engine, each holding its Dirichlet share of one tree of real
digits (the ``label-skew`` benchmark): the 10-client case of ``benchmarks/scale.py``, which measures 10, 30
and 100 (README "Scale"). Checks what grows with the number of clients: every client uploads and
evaluates, the report lists them in numeric order, samples.png keeps a readable size, the server's log
does not print a line per client per wait, and the clients keep one copy of the broadcast model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from e2e_support import FAST, hub_env
from oscar_demo.demo_data import DIGIT_NAMES, make_digit_tree
from oscar_demo.federation import LocalFederation
from oscar_server.report import SAMPLE_COLUMNS

pytestmark = pytest.mark.e2e
CLIENTS = 10


def test_ten_label_skew_clients_on_the_simulation_engine(tmp_path: Path, tiny_hub: Path) -> None:
    tree = make_digit_tree(tmp_path / "digits", per_class=30)  # 300 digits; alpha 0.5 leaves each client a class
    run_config = {**FAST, "class-names": ",".join(DIGIT_NAMES), "device": "cpu", "images-per-class": 1,
                  "num-inference-steps": 4, "inversion-steps": 20, "classifier-pretrained": False,
                  "classifier-image-size": 32, "min-clients": CLIENTS, "run-dir": str(tmp_path / "runs"),
                  "run-name": "ten", "benchmark": "label-skew", "benchmark-root": str(tree),
                  "num-clients": CLIENTS, "alpha": 0.5}
    with LocalFederation(tmp_path / "federation", [], env=hub_env(tiny_hub), stream=False,
                         simulation_supernodes=CLIENTS,
                         simulation_config={"client-resources-num-cpus": 1}) as federation:
        report_path = federation.run(run_config, timeout=420)
    assert not federation.leftovers

    report = json.loads(report_path.read_text())
    assert report["status"] == "completed", report.get("error")
    names = [c["name"] for c in report["clients"]]
    assert names == [f"client-{k}" for k in range(CLIENTS)]  # numeric order: client-2 before client-10
    assert all(c["test_accuracy"] is not None for c in report["clients"]) and not report["rejected"]
    md = (report_path.parent / "report.md").read_text()
    assert md.index("| client-2 ") < md.index("| client-9 ")

    with Image.open(report_path.parent / "samples.png") as grid:  # one column per client, at most SAMPLE_COLUMNS
        assert grid.width <= 110 + 96 * min(CLIENTS, SAMPLE_COLUMNS)

    # The server says it is waiting when the count changes, not once per client per poll.
    server_log = "\n".join(p.read_text(errors="replace") for p in federation.logs_dir.glob("flwr-run-*.log"))
    assert server_log.count("waiting for") <= 3 * CLIENTS, server_log[-3000:]

    # Every client's output dir holds the broadcast model, and all of them are one file on disk.
    models = sorted((tree / ".oscar-output").rglob("*.safetensors"))
    assert len(models) >= CLIENTS
    assert len({(os.stat(p).st_dev, os.stat(p).st_ino) for p in models}) == 1
