"""The paper's baselines without processes: FedAvg's waiting rule and config, the centralized ceiling, and the
comparison tables (FedAvg on a real federation: tests/e2e/test_fedavg.py)."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord

from oscar_baselines.centralized import client_settings, run_centralized
from oscar_baselines.compare import compare, fedcado_upload_bytes
from oscar_baselines.compare import main as compare_main
from oscar_baselines.fedavg_config import FedAvgConfig
from oscar_baselines.fedavg_server import MeasuredFedAvg, NotEnoughClientsError
from oscar_common.conditioning import conditioning_sentence
from oscar_common.data.local import load_client_split
from oscar_common.settings import coerce, declared_settings
from oscar_common.training.classifier import build_classifier, classifier_from_bytes
from oscar_demo.demo_data import DIGIT_NAMES, make_demo_data


def _state_dict_bytes(num_classes: int) -> int:
    return sum(t.numel() * t.element_size() for t in build_classifier(num_classes).state_dict().values())


# ------------------------------------------------------------------------------------------ FedAvg
class _OneNodeGrid:
    """A Grid stand-in with one connected node; it fails instead of letting a caller poll it forever."""

    def __init__(self) -> None:
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        if self.calls > 10:
            raise RuntimeError("polled 10 times: FedAvg's sample_nodes would wait forever")
        return [7]


def test_fedavg_does_not_wait_forever_for_clients(tmp_path: Path) -> None:
    cfg = FedAvgConfig(class_names=("a", "b"), min_clients=2, wait_for_clients_timeout=0.5)
    strategy = MeasuredFedAvg(cfg, tmp_path / "report.json")
    with pytest.raises(NotEnoughClientsError, match="only 1 of min-clients=2"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _OneNodeGrid())


def test_fedavg_config() -> None:
    cfg = FedAvgConfig.from_run_config({"class-names": "a, b,c", "num-rounds": 3, "lr": 1, "scheme": "pooled"})
    assert cfg.class_names == ("a", "b", "c") and cfg.num_rounds == 3 and cfg.lr == 1.0
    assert cfg.client_config()["class-names"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="class-names"):
        FedAvgConfig.from_run_config({})
    with pytest.raises(ValueError, match="num-rounds"):
        FedAvgConfig.from_run_config({"class-names": "a", "num-rounds": 0})
    with pytest.raises(ValueError, match="classifier-pretrained"):
        FedAvgConfig.from_run_config({"class-names": "a", "classifier-pretrained": "maybe"})


def test_fedavg_pyproject_holds_exactly_the_declared_keys_and_defaults() -> None:
    app = Path(__file__).resolve().parents[2] / "baselines" / "fedavg" / "pyproject.toml"
    listed = tomllib.loads(app.read_text())["tool"]["flwr"]["app"]["config"]
    declared = {s.key: s for s in declared_settings(FedAvgConfig)}
    assert sorted(listed) == sorted(declared)
    assert {key: coerce(declared[key], value) for key, value in listed.items()} == {
        key: s.default for key, s in declared.items()}


# ------------------------------------------------------------------------------------- Centralized
def test_centralized_on_demo_clients(tmp_path: Path, demo_clients: dict[str, Path]) -> None:
    """Trains on the union of the clients' training splits and scores each client's own test split."""
    names = sorted(demo_clients)
    clients = client_settings([demo_clients[names[0]]],
                              [f"data-dir='{demo_clients[names[1]]}' name='second' test-fraction=0.5"])
    report = run_centralized(clients, DIGIT_NAMES, epochs=1, batch_size=16, image_size=32, pretrained=False,
                             device="cpu", out_dir=tmp_path)
    splits = [load_client_split(demo_clients[names[0]], DIGIT_NAMES, seed=0),
              load_client_split(demo_clients[names[1]], DIGIT_NAMES, test_fraction=0.5, seed=0)]
    assert [c["name"] for c in report["clients"]] == [names[0], "second"]
    assert report["training"]["images"] == sum(len(train) for train, _ in splits)
    for client, (train, test) in zip(report["clients"], splits):
        assert client["num_train"] == len(train) and client["num_test"] == len(test)
        assert 0.0 <= client["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text()) == report
    classifier_from_bytes((tmp_path / "model.safetensors").read_bytes(), len(DIGIT_NAMES), DIGIT_NAMES)


def test_centralized_skips_unreadable_images_on_both_sides(tmp_path: Path, demo_clients: dict[str, Path]) -> None:
    data = tmp_path / "plain"
    shutil.copytree(demo_clients["plain"], data)
    for digit in DIGIT_NAMES:  # one truncated PNG per class: some land in the train split, some in the test split
        (data / digit / "zz-corrupt.png").write_bytes(next((data / digit).glob("*.png")).read_bytes()[:50])
    report = run_centralized(client_settings([data], []), DIGIT_NAMES, epochs=1, batch_size=16, image_size=32,
                             pretrained=False, device="cpu")
    (client,) = report["clients"]
    assert report["training"]["unreadable_images"] + client["unreadable_test_images"] == len(DIGIT_NAMES)
    assert client["unreadable_test_images"] > 0 and client["test_accuracy"] is not None


def test_centralized_learns_separable_digits(tmp_path: Path) -> None:
    """Two digits, two domains: the ceiling must be far above chance (0.5)."""
    clients = make_demo_data(tmp_path / "data", per_class=20, seed=1)
    settings = client_settings([clients["plain"], clients["inverted-noisy"]], [])
    # 10 epochs: StepLR(7) lowers the rate for the last ones, after which the BatchNorm statistics settle
    report = run_centralized(settings, ["zero", "one"], epochs=10, batch_size=16, lr=0.01, image_size=32,
                             pretrained=False, device="cpu")
    assert report["accuracy"]["weighted"] >= 0.8, report["clients"]


# ----------------------------------------------------------------------------------------- Compare
def _report(method: str, accuracies: dict[str, float], upload: dict[str, int] | None = None,
            num_test: dict[str, int] | None = None, **config) -> dict:
    return {
        "method": method, "status": "completed", "config": {"class-names": ["a", "b", "c"], **config},
        "clients": [{"name": name, "test_accuracy": acc, "num_test": (num_test or {}).get(name, 10),
                     **({"upload_bytes": upload[name]} if upload else {})} for name, acc in accuracies.items()],
    }


def test_compare_tables(tmp_path: Path) -> None:
    # clipart has 3x sketch's test images: the official "Overall" (sum correct / sum samples) weighs it 3x
    oscar = _report("oscar", {"clipart": 0.5, "sketch": 0.7}, {"clipart": 6_000, "sketch": 4_000},
                    {"clipart": 300, "sketch": 100}, scheme="pooled", **{"prompt-template": "{class_name}, {prompt}"},
                    captioner="Salesforce/blip-image-captioning-base")
    fedavg = _report("fedavg", {"clipart": 0.2, "sketch": 0.4}, {"clipart": 900_000_000, "sketch": 800_000_000},
                     **{"num-rounds": 10})
    centralized = _report("centralized", {"clipart": 0.9})  # a client missing: its average is partial
    paths = {}
    for name, report in (("oscar", oscar), ("fedavg", fedavg), ("centralized", centralized)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(report))
    out = tmp_path / "out"
    compare_main(["--oscar", str(paths["oscar"]), "--fedavg", str(paths["fedavg"]),
                  "--centralized", str(paths["centralized"]), "--out", str(out)])
    result = json.loads((out / "compare.json").read_text())

    assert result["clients"] == ["clipart", "sketch"]
    rows = {r["method"]: r for r in result["accuracy"]}
    assert [r["method"] for r in result["accuracy"]] == ["FedAvg", "OSCAR", "Centralized"]
    assert rows["OSCAR"]["clients"] == {"clipart": 0.5, "sketch": 0.7}
    assert rows["OSCAR"]["overall"] == pytest.approx((150 + 70) / 400) and rows["OSCAR"]["complete"]
    assert rows["OSCAR"]["client_mean"] == pytest.approx(0.6)
    assert (rows["FedAvg"]["overall"], rows["FedAvg"]["client_mean"]) == pytest.approx((0.3, 0.3))  # equal sizes
    assert rows["Centralized"]["clients"]["sketch"] is None
    assert rows["Centralized"]["overall"] == pytest.approx(0.9) and not rows["Centralized"]["complete"]
    assert result["oscar_conditioning"]["prompt_template"] == "{class_name}, {prompt}"

    upload = {r["method"]: r for r in result["upload_bytes"]}
    assert upload["OSCAR"]["clients"] == {"clipart": 6_000, "sketch": 4_000} and upload["OSCAR"]["mean"] == 5_000
    assert upload["FedAvg"]["mean"] == 850_000_000 and upload["FedAvg"]["times_oscar"] == pytest.approx(170_000)
    assert "10 rounds" in upload["FedAvg"]["source"]
    params = sum(p.numel() for p in build_classifier(3).parameters())
    assert params == 11_176_512 + 513 * 3  # ResNet-18 without its 1000-way head, plus a 3-way one
    assert upload["FedCADO"]["clients"] == {"clipart": 4 * params, "sketch": 4 * params}
    assert "computed" in upload["FedCADO"]["source"]

    markdown = (out / "compare.md").read_text()
    assert "| method | clipart | sketch | overall | client mean |" in markdown
    assert "| OSCAR | 50.00 | 70.00 | 55.00 | 60.00 |" in markdown
    assert "| Centralized | 90.00 | — | 90.00* | 90.00* |" in markdown
    assert "the official code's \"Overall\"" in markdown
    assert "through the template `{class_name}, {prompt}` (the class name in the prompt is this project's" in markdown
    assert "| OSCAR | 6.00 KB | 4.00 KB | 5.00 KB | 1 |" in markdown


def test_compare_names_the_tokens_conditioning() -> None:
    oscar = _report("oscar", {"a": 0.5}, {"a": 1}, scheme="tokens", **{"prompt-template": "{class_name}, {prompt}"})
    sentence = conditioning_sentence(compare(oscar=oscar)["oscar_conditioning"])
    assert "scheme `tokens`" in sentence and "without the class name" in sentence and "template" not in sentence


def test_fedcado_size_matches_resnet18() -> None:
    for num_classes in (2, 10, 345):  # 345: DomainNet
        model = build_classifier(num_classes)
        assert fedcado_upload_bytes(num_classes) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_compare_refuses_mismatched_runs(tmp_path: Path) -> None:
    oscar = _report("oscar", {"a": 0.5}, {"a": 1})
    other = {**_report("fedavg", {"a": 0.5}, {"a": 1}, **{"num-rounds": 1}),
             "config": {"class-names": ["x"], "num-rounds": 1}}
    with pytest.raises(ValueError, match="different class lists"):
        compare(oscar=oscar, fedavg=other)
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({**oscar, "status": "failed", "error": "boom"}))
    with pytest.raises(ValueError, match="not completed"):
        compare_main(["--oscar", str(failed), "--out", str(tmp_path / "out")])
