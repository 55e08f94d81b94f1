"""OSCAR next to its baselines: the paper's Table I (accuracy) and its communication comparison.

    oscar-compare --oscar runs/x/report.json --fedavg runs/fedavg-1/report.json \\
        --centralized runs/centralized/report.json --out runs/compare

writes ``compare.json`` and ``compare.md`` to ``--out``:

* accuracy: rows FedAvg, OSCAR, Centralized; columns the clients (domains), then ``overall``: correct
  predictions over test images of all the clients the method has, the official code's "Overall"
  (obaidullahzaland/oscar train.py:336-343 @4b6c7f5, its final evaluation: ``total_correct /
  total_samples``), the definition to hold against the paper's Table I; and ``client mean``, the
  unweighted mean of the client columns, which differs from it when the test sets differ in size;
* upload per client: OSCAR and FedAvg as measured on the wire by their runs (FedAvg: all rounds),
  and FedCADO's single model upload, *computed* as the float32 bytes of a ResNet-18 classifier's
  parameters for the run's class count (FedCADO is not run here).

Every report is read by the fields the three reports share: ``status``, ``config["class-names"]`` and
``clients[]`` with ``name``, ``test_accuracy``, ``num_test`` and (federated methods) ``upload_bytes``.
``compare.md`` also says how OSCAR's images were conditioned (scheme, prompt template, captioner), since
the class name in the prompt is this project's addition (docs/official-code.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from oscar_common.accuracy import client_mean_accuracy, overall_accuracy
from oscar_common.conditioning import conditioning, conditioning_sentence
from oscar_common.files import atomic_write_bytes, atomic_write_json
from oscar_common.training.classifier import build_classifier

ACCURACY_METHODS = ("FedAvg", "OSCAR", "Centralized")  # the order of Table I's rows
FLOAT32_BYTES = 4


def fedcado_upload_bytes(num_classes: int) -> int:
    """Float32 bytes of a ResNet-18 classifier's parameters: what one FedCADO client uploads, once."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_classifier(num_classes)
    return sum(p.numel() for p in model.parameters()) * FLOAT32_BYTES


def load_report(path: Path) -> dict[str, Any]:
    report = json.loads(Path(path).read_text())
    if report.get("status") != "completed":
        raise ValueError(f"{path}: the run is not completed (status {report.get('status')!r}, "
                         f"error {report.get('error')!r})")
    return report


def compare(oscar: Mapping[str, Any] | None = None, fedavg: Mapping[str, Any] | None = None,
            centralized: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The two tables as data (bytes and accuracies exact, as in the reports)."""
    reports = {m: r for m, r in zip(ACCURACY_METHODS, (fedavg, oscar, centralized)) if r is not None}
    if not reports:
        raise ValueError("nothing to compare: give at least one report")
    class_lists = {m: list(r["config"]["class-names"]) for m, r in reports.items()}
    class_names = next(iter(class_lists.values()))
    if any(names != class_names for names in class_lists.values()):
        raise ValueError(f"the reports were run on different class lists: {class_lists}")
    clients = sorted({c["name"] for r in reports.values() for c in r["clients"]})

    accuracy = []
    for method, report in reports.items():
        by_client = {c["name"]: c for c in report["clients"]}
        evaluated = [by_client[name] for name in clients
                     if by_client.get(name, {}).get("test_accuracy") is not None]
        values = [c["test_accuracy"] for c in evaluated]
        counted = all(c.get("num_test") for c in evaluated)  # a report without test counts has no overall
        accuracy.append({
            "method": method,
            "clients": {name: by_client.get(name, {}).get("test_accuracy") for name in clients},
            "overall": overall_accuracy([(c["test_accuracy"], c["num_test"]) for c in evaluated]) if counted else None,
            "client_mean": client_mean_accuracy(values),
            "complete": len(values) == len(clients),  # False: overall and client mean leave some clients out
        })

    upload = []
    if fedavg is not None:
        rounds = fedavg["config"]["num-rounds"]
        upload.append(_measured("FedAvg", fedavg, clients, f"measured on the wire, all {rounds} rounds"))
    model_bytes = fedcado_upload_bytes(len(class_names))
    upload.append({
        "method": "FedCADO", "clients": {name: model_bytes for name in clients}, "mean": model_bytes,
        "source": f"computed, not run: float32 parameters of a ResNet-18 with {len(class_names)} classes, "
                  "uploaded once",
    })
    if oscar is not None:
        upload.append(_measured("OSCAR", oscar, clients, "measured on the wire, one round"))
    oscar_mean = upload[-1]["mean"] if oscar is not None else None
    for row in upload:
        row["times_oscar"] = row["mean"] / oscar_mean if oscar_mean and row["mean"] is not None else None
    return {"class_names": class_names, "clients": clients, "accuracy": accuracy, "upload_bytes": upload,
            "oscar_conditioning": conditioning(oscar["config"]) if oscar is not None else None}


def _measured(method: str, report: Mapping[str, Any], clients: list[str], source: str) -> dict[str, Any]:
    by_client = {c["name"]: c["upload_bytes"] for c in report["clients"]}
    values = [by_client[name] for name in clients if name in by_client]
    return {"method": method, "clients": {name: by_client.get(name) for name in clients},
            "mean": sum(values) / len(values) if values else None, "source": source}


def render_markdown(result: Mapping[str, Any]) -> str:
    clients = result["clients"]
    head = "| method | " + " | ".join(clients) + " | {last} |"
    rule = "|---|" + "---:|" * (len(clients) + 1)
    lines = ["# OSCAR and its baselines", "",
             f"{len(result['class_names'])} classes; top-1 accuracy (%) of each method's final ResNet-18 on each "
             "client's own test split.", "",
             "**overall** = correct predictions / test images over all clients, the official code's "
             "\"Overall\" and the definition to compare with the paper's Table I; **client mean** = the "
             "unweighted mean of the client columns.", "",
             head.format(last="overall") + " client mean |", rule + "---:|"]
    incomplete = False
    for row in result["accuracy"]:
        cells = [_percent(row["clients"][name]) for name in clients]
        mark = "" if row["complete"] else "*"
        incomplete |= not row["complete"]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {_percent(row['overall'])}{mark} | "
                     f"{_percent(row['client_mean'])}{mark} |")
    if incomplete:
        lines += ["", "\\* over the clients this method has a result for."]
    if result.get("oscar_conditioning"):
        lines += ["", conditioning_sentence(result["oscar_conditioning"])]
    lines += ["", "## Upload per client", "",
              "Bytes each client sends to the server over the whole run.", "",
              head.format(last="mean") + " x OSCAR | how |", rule + "---:|---|"]
    for row in result["upload_bytes"]:
        cells = [_bytes(row["clients"][name]) for name in clients]
        factor = "—" if row["times_oscar"] is None else f"{row['times_oscar']:,.0f}"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {_bytes(row['mean'])} | {factor} | "
                     f"{row['source']} |")
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} B"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oscar", type=Path, help="OSCAR's report.json")
    parser.add_argument("--fedavg", type=Path, help="the FedAvg baseline's report.json")
    parser.add_argument("--centralized", type=Path, help="oscar-centralized's report.json")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.json and .md")
    args = parser.parse_args(argv)
    reports = {name: load_report(path) if path else None
               for name, path in (("oscar", args.oscar), ("fedavg", args.fedavg), ("centralized", args.centralized))}
    result = compare(**reports)
    markdown = render_markdown(result)
    atomic_write_json(args.out / "compare.json", result)
    atomic_write_bytes(args.out / "compare.md", markdown.encode())
    print(markdown)
    print(f"written: {args.out / 'compare.json'}, {args.out / 'compare.md'}")


if __name__ == "__main__":
    main()
