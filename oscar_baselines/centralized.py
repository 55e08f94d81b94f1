"""The centralized ceiling: one ResNet-18 trained on the union of the clients' training data.

What a server could reach if the clients gave up their images: the same clients, the same
deterministic train/test splits as OSCAR and FedAvg (``NodeSettings.load_split`` with the
same seed and node settings), the same ResNet-18 recipe; the model is scored on each client's own
test split, like the federated methods. A client is given either as ``--data-dir DIR`` or, for split
files and other node settings, as ``--node-config "..."`` with exactly the string its SuperNode gets::

    oscar-centralized --data-dir /data/clipart --data-dir /data/sketch \\
        --class-names airplane,clock,axe --epochs 25 --out runs/centralized

writes ``<out>/report.json`` (clients[].name / test_accuracy / num_test, as OSCAR's report) and
``<out>/model.safetensors``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from flwr.common.config import parse_config_args

from oscar_common.accuracy import client_mean_accuracy, overall_accuracy
from oscar_common.data.local import ImageListDataset
from oscar_common.devices import resolve_device
from oscar_common.files import atomic_write_json
from oscar_common.logs import setup_logging
from oscar_common.node_settings import NodeSettings
from oscar_common.training.classifier import (
    ARCHITECTURE,
    build_classifier,
    eval_transform,
    evaluate_classifier,
    save_classifier,
)
from oscar_common.training.image_cache import decode_images
from oscar_common.training.loop import train_classifier
from oscar_common.training.recipes import resolve_recipe

# Random crops and flips, StepLR(7, 0.1): the recipe these baselines have always used (epochs, batch size
# and lr are their own arguments).
RECIPE = "augmented"

log = logging.getLogger("oscar.centralized")


def run_centralized(
    clients: Sequence[NodeSettings],
    class_names: Sequence[str],
    *,
    epochs: int = 25,
    batch_size: int = 32,
    lr: float = 0.001,
    image_size: int = 224,
    pretrained: bool = True,
    seed: int = 0,
    device: str = "auto",
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Train on the union of the clients' training splits, evaluate on each test split; the report.

    With ``out_dir``, also writes ``report.json`` and ``model.safetensors`` there.
    """
    if not clients:
        raise ValueError("no clients: give at least one --data-dir or --node-config")
    names = [c.name for c in clients]
    if len(set(names)) != len(names):
        raise ValueError(f"client names must be unique, got {names} (set name=... in --node-config)")
    class_names = list(class_names)
    started = time.monotonic()
    splits = {c.name: c.load_split(class_names, seed)[:2] for c in clients}
    recipe = resolve_recipe(RECIPE, epochs=epochs, lr=lr, batch_size=batch_size)
    torch_device = resolve_device(device)
    samples = [s for train, _ in splits.values() for s in train]
    train_set = decode_images([s.path for s in samples], [class_names.index(s.class_name) for s in samples],
                              side=recipe.cache_size(image_size), device=torch_device, num_workers=0)
    log.info("training on %d images of %d clients", len(train_set), len(clients))
    model = build_classifier(len(class_names), pretrained=pretrained, seed=seed)
    stats = train_classifier(model, train_set, recipe=recipe, image_size=image_size, seed=seed,
                             device=torch_device, precision="auto")
    results = []
    for client in clients:
        train, test = splits[client.name]
        test_set = ImageListDataset.from_samples(test, class_names, eval_transform(image_size, RECIPE),
                                                 skip_unreadable=True)
        result = evaluate_classifier(model, test_set, len(class_names), batch_size=64, device=torch_device)
        log.info("client %s: test accuracy %.4f on %d images", client.name, result.accuracy, result.n)
        results.append({
            "name": client.name, "data_dir": str(client.data_dir), "num_train": len(train),
            "test_accuracy": result.accuracy, "num_test": result.n, "unreadable_test_images": result.unreadable,
            "per_class_accuracy": {class_names[c]: round(a, 4) for c, a in sorted(result.per_class_accuracy.items())},
        })
    report = {
        "method": "centralized",
        "status": "completed",
        "config": {"class-names": class_names, "epochs": epochs, "batch-size": batch_size, "lr": lr,
                   "classifier-image-size": image_size, "classifier-pretrained": pretrained, "seed": seed,
                   "device": device},
        "model": {"architecture": ARCHITECTURE, "num_classes": len(class_names)},
        "clients": results,
        "training": {"images": len(train_set), "unreadable_images": len(train_set.unreadable), "epochs": epochs,
                     "seconds": round(stats.seconds, 2),
                     "train_accuracy": stats.train_accuracy, "losses": [round(x, 5) for x in stats.losses]},
        "accuracy": {"mean": client_mean_accuracy([r["test_accuracy"] for r in results]),
                     "weighted": overall_accuracy([(r["test_accuracy"], r["num_test"]) for r in results])},
        "timings_seconds": {"total": round(time.monotonic() - started, 2)},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_classifier(model, out_dir / "model.safetensors", {"method": "centralized"}, class_names=class_names)
        atomic_write_json(out_dir / "report.json", report)
    return report


def client_settings(data_dirs: Sequence[Path], node_configs: Sequence[str]) -> list[NodeSettings]:
    """Clients from ``--data-dir`` paths and ``--node-config`` strings (the SuperNode's own syntax)."""
    configs = [{"data-dir": str(d)} for d in data_dirs] + [parse_config_args([c]) for c in node_configs]
    return [NodeSettings.from_context(config, {}) for config in configs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, action="append", default=[],
                        help="a client's image folders (<class>/<images>); repeat per client")
    parser.add_argument("--node-config", action="append", default=[],
                        help="a client as its SuperNode's --node-config string (split files, test-fraction, "
                             "name: docs/configuration.md lists the keys); repeat per client")
    parser.add_argument("--class-names", required=True, help="comma-separated class list (as OSCAR's)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--image-size", type=int, default=224, help="classifier input size")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="start from random weights instead of ImageNet's")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: splits (as OSCAR's) and training")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/centralized"),
                        help="folder for report.json and model.safetensors")
    args = parser.parse_args(argv)
    setup_logging()
    class_names = [name.strip() for name in args.class_names.split(",") if name.strip()]
    report = run_centralized(client_settings(args.data_dir, args.node_config), class_names, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
                             pretrained=args.pretrained, seed=args.seed, device=args.device, out_dir=args.out)
    for client in report["clients"]:
        print(f"{client['name']}: {client['test_accuracy']:.4f} ({client['num_test']} test images)")
    print(f"mean {report['accuracy']['mean']:.4f}; report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
