"""The FedAvg baseline's Flower ClientApp: local SGD epochs on the global ResNet-18, then evaluation.

The client's data, node config (``data-dir``, ``name``, ``test-fraction``, ``train-list``/``test-list``,
``device``) and deterministic train/test split are exactly OSCAR's (``NodeSettings`` and
``NodeSettings.load_split`` with the run's seed), so both methods are scored on the same test images.

``train``: load the global state dict, train ``local-epochs`` epochs on the local training split, reply
with the new state dict and ``num-examples`` (FedAvg's weight).
``evaluate``: top-1 accuracy of the global model on the local test split.
"""

from __future__ import annotations

import dataclasses
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from oscar_baselines.fedavg_config import ARRAYS_KEY, CONFIG_KEY, INFO_KEY, METRICS_KEY
from oscar_common.data.local import ImageListDataset
from oscar_common.devices import resolve_device
from oscar_common.logs import setup_logging
from oscar_common.node_settings import NodeSettings
from oscar_common.training.classifier import build_classifier, eval_transform, evaluate_classifier
from oscar_common.training.image_cache import decode_images
from oscar_common.training.loop import train_classifier
from oscar_common.training.recipes import resolve_recipe

log = logging.getLogger("oscar.fedavg.client")
app = ClientApp()
# Random crops and flips, StepLR(7, 0.1) over the local epochs: the recipe this baseline has always used.
RECIPE = "augmented"


@app.train()
def train(msg: Message, context: Context) -> Message:
    setup_logging()
    node = NodeSettings.from_context(context.node_config, context.run_config)
    config = msg.content.config_records[CONFIG_KEY]
    class_names = list(config["class-names"])
    model = _global_model(msg, len(class_names))
    train_samples, _, _ = node.load_split(class_names, int(config["seed"]))
    image_size = int(config["classifier-image-size"])
    recipe = dataclasses.replace(  # FedAvg averages what local training ends with: the last epoch
        resolve_recipe(RECIPE, epochs=int(config["local-epochs"]), lr=float(config["lr"]),
                       batch_size=int(config["batch-size"])), keep_best_epoch=False)
    device = resolve_device(node.device)
    dataset = decode_images([s.path for s in train_samples], [class_names.index(s.class_name) for s in train_samples],
                            side=recipe.cache_size(image_size), device=device, num_workers=0)
    server_round = int(config["server-round"])
    stats = train_classifier(model, dataset, recipe=recipe, image_size=image_size,
                             seed=int(config["seed"]) + server_round, device=device, precision="auto",
                             log_every_epoch=False)
    log.info("client %s, round %d: %d local epochs on %d images, loss %.4f, train accuracy %.4f",
             node.name, server_round, stats.epochs, len(dataset), stats.losses[-1], stats.train_accuracy)
    return Message(content=RecordDict({
        ARRAYS_KEY: ArrayRecord(model.to("cpu").state_dict()),
        METRICS_KEY: MetricRecord({"num-examples": len(dataset), "train-loss": float(stats.losses[-1]),
                                   "train-accuracy": float(stats.train_accuracy)}),
        INFO_KEY: ConfigRecord({"client-name": node.name}),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    setup_logging()
    node = NodeSettings.from_context(context.node_config, context.run_config)
    config = msg.content.config_records[CONFIG_KEY]
    class_names = list(config["class-names"])
    model = _global_model(msg, len(class_names))
    _, test_samples, _ = node.load_split(class_names, int(config["seed"]))
    dataset = ImageListDataset.from_samples(test_samples, class_names,
                                            eval_transform(int(config["classifier-image-size"]), RECIPE),
                                            skip_unreadable=True)
    result = evaluate_classifier(model, dataset, len(class_names), batch_size=64, device=resolve_device(node.device))
    log.info("client %s, round %s: test accuracy %.4f on %d images", node.name, config["server-round"],
             result.accuracy, result.n)
    return Message(content=RecordDict({
        METRICS_KEY: MetricRecord({"num-examples": result.n, "accuracy": float(result.accuracy)}),
        INFO_KEY: ConfigRecord({"client-name": node.name}),
    }), reply_to=msg)


def _global_model(msg: Message, num_classes: int) -> nn.Module:
    model = build_classifier(num_classes)
    # strict: a state dict of another architecture or class count fails here, naming the tensors
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict(), strict=True)
    return model
