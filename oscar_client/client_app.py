"""OSCAR's Flower ClientApp: one upload of per-class text-embedding means, one final evaluation.

``train``: caption the local training images with the frozen captioner, encode the captions with the
text encoder the server names, average per class and reply with the means (see
``oscar_common.wire`` for the wire format). Nothing is trained here.

``evaluate.final``: load the ResNet-18 the server trained on synthetic images (validated before it is
used), evaluate it on this client's test split, keep the weights, reply with the metrics.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from oscar_client.encoder import encode_local_data
from oscar_common.node_settings import NodeSettings
from oscar_common.classifier import (
    classifier_from_bytes,
    eval_transform,
    evaluate_classifier,
)
from oscar_common.logs import setup_logging
from oscar_common.devices import resolve_device, resolve_dtype
from oscar_common.data import ImageListDataset, load_rgb_images
from oscar_common.files import atomic_write_bytes
from oscar_common.wire import INSTRUCTION_KEY, ClientPayload, model_blob

log = logging.getLogger("oscar.client")
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Encode local data and upload the per-class means (the single OSCAR round)."""
    setup_logging()
    instruction = _instruction(msg)
    node = NodeSettings.from_context(context.node_config, context.run_config)
    class_names = list(instruction["class-names"])
    started = time.monotonic()

    train_samples, _, unknown_classes = node.load_split(class_names, int(instruction["seed"]))
    images, kept, unreadable = load_rgb_images(train_samples)
    labels = np.array([class_names.index(train_samples[i].class_name) for i in kept], dtype=np.int64)
    log.info("client %s: %d training images in %d classes (%d unreadable skipped, unknown folders: %s)",
             node.name, len(images), len(set(labels.tolist())), len(unreadable), unknown_classes or "none")
    if not images:
        raise ValueError(f"client {node.name}: no readable training images under {node.data_dir}")

    device = resolve_device(node.device)
    encoded = encode_local_data(
        images, labels,
        scheme=str(instruction["scheme"]),
        captioner_id=str(instruction["captioner"]),
        encoder_id=str(instruction["encoder-id"]),
        device=device,
        dtype=resolve_dtype("auto", device),
        min_count=int(instruction["min-images-per-class"]),
        caption_batch_size=int(instruction["caption-batch-size"]),
        caption_max_tokens=int(instruction["caption-max-tokens"]),
    )
    payload = ClientPayload(
        class_ids=encoded.class_ids,
        counts=encoded.counts,
        means=encoded.means,
        scheme=str(instruction["scheme"]),
        encoder_id=str(instruction["encoder-id"]),
        client_name=node.name,
        num_images=len(images),
        unreadable_images=len(unreadable),
        skipped_classes=unknown_classes,
    )
    log.info("client %s: uploading means of shape %s after %.1fs", node.name, list(encoded.means.shape),
             time.monotonic() - started)
    return Message(content=payload.to_recorddict(), reply_to=msg)


@app.evaluate("final")
def evaluate_final(msg: Message, context: Context) -> Message:
    """Evaluate the broadcast classifier on this client's own test split."""
    setup_logging()
    instruction = _instruction(msg)
    node = NodeSettings.from_context(context.node_config, context.run_config)
    class_names = list(instruction["class-names"])

    # Validate before use: architecture, class count and every tensor shape (ClassifierFormatError).
    blob = model_blob(msg.content)
    model = classifier_from_bytes(blob, expected_num_classes=len(class_names),
                                  expected_class_names=class_names)
    node.output_dir.mkdir(parents=True, exist_ok=True)
    weights_path = node.output_dir / "oscar_resnet18.safetensors"
    atomic_write_bytes(weights_path, blob)

    _, test_samples, _ = node.load_split(class_names, int(instruction["seed"]))
    items = [(s.path, class_names.index(s.class_name)) for s in test_samples]
    dataset = ImageListDataset(items, eval_transform(int(instruction["classifier-image-size"])))
    result = evaluate_classifier(model, dataset, len(class_names), batch_size=64,
                                 device=resolve_device(node.device))
    log.info("client %s: test accuracy %.4f on %d images; weights saved to %s",
             node.name, result.accuracy, result.n, weights_path)
    present = sorted(result.per_class_accuracy)
    metrics = MetricRecord({
        "accuracy": float(result.accuracy),
        "num-examples": int(result.n),
        "per-class-ids": [int(c) for c in present],
        "per-class-accuracy": [float(result.per_class_accuracy[c]) for c in present],
    })
    info = ConfigRecord({"client-name": node.name, "weights-path": str(weights_path)})
    return Message(content=RecordDict({"metrics": metrics, "info": info}), reply_to=msg)


def _instruction(msg: Message) -> ConfigRecord:
    if INSTRUCTION_KEY not in msg.content.config_records:
        raise ValueError(f"message has no '{INSTRUCTION_KEY}' ConfigRecord: is the server an OSCAR server?")
    return msg.content.config_records[INSTRUCTION_KEY]

