"""OSCAR's Flower ClientApp: one upload of per-class text-embedding means, one final evaluation.

``train``: caption the local training images with the frozen captioner, encode the captions with the
text encoder the server names, average per class and reply with the means (``oscar_client.upload``;
the wire format is ``oscar_common.wire``). Nothing is trained here.

``evaluate.final``: load the ResNet-18 the server trained on synthetic images (validated before it is
used), evaluate it on this client's test split, keep the weights, reply with the metrics.

``query.identify``: say which client this is (a resumed run finds its clients on new node ids).

A client that cannot do what it is asked (no data dir, no matching class folders, no preview approval)
replies with a :class:`~oscar_common.wire.ClientFailure`: the server reports it under this client's name
with a one-line reason; the traceback stays in this client's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from oscar_client.policy import ClientPolicy
from oscar_common.data.local import ImageListDataset
from oscar_common.devices import resolve_device
from oscar_common.files import atomic_write_bytes, safe_filename, write_shared_copy
from oscar_common.logs import setup_logging
from oscar_common.node_settings import NodeSettings
from oscar_common.training.classifier import classifier_from_bytes, evaluate_classifier
from oscar_common.training.recipes import Preprocessing, standard_preprocessing
from oscar_common.wire import (
    ClientFailure,
    EvaluateInstruction,
    Evaluation,
    Identity,
    TrainInstruction,
    instruction_record,
    model_blob,
    upload_content,
)

log = logging.getLogger("oscar.client")
app = ClientApp()
WEIGHTS_FILE = "oscar_resnet18.safetensors"
SHARED_MODELS_DIR = ".models"  # in NodeSettings.shared_dir: received models by content hash


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Encode local data and upload the per-class means (the single OSCAR round)."""
    return _reply_or_failure(msg, context, "upload", _upload)


@app.evaluate("final")
def evaluate_final(msg: Message, context: Context) -> Message:
    """Evaluate the broadcast classifier on this client's own test split."""
    return _reply_or_failure(msg, context, "evaluation", _evaluate)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    setup_logging()
    return Message(content=Identity(client_name=_client_name(context.node_config, context.run_config)).to_record(),
                   reply_to=msg)


def _upload(msg: Message, context: Context) -> Message:
    # Imported here: the captioning stack (transformers, ...) is what a train message needs, not the others.
    from oscar_client.preview import check_preview_approval
    from oscar_client.upload import prepare_upload, record_release, write_local_summary

    started = time.monotonic()
    instruction = TrainInstruction.from_record(instruction_record(msg.content))
    node = NodeSettings.from_context(context.node_config, context.run_config)
    policy = ClientPolicy.from_node_config(context.node_config)
    prepared = prepare_upload(node, instruction, policy)
    if policy.require_preview_approval:
        check_preview_approval(node, instruction, prepared.digest)
    summary = write_local_summary(node, prepared)
    record_release(node, prepared, policy)  # from here on the upload counts as released (oscar_client.ledger)
    upload = prepared.upload
    log.info("client %s: uploading %d rows of shape %s (%s) after %.1fs; what stays here: %s", node.name,
             len(upload.class_ids), list(upload.means.shape[1:]),
             f"DP epsilon {upload.dp.epsilon:g}" if upload.dp else "no DP", time.monotonic() - started, summary)
    return Message(content=upload_content(upload), reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    instruction = EvaluateInstruction.from_record(instruction_record(msg.content))
    node = NodeSettings.from_context(context.node_config, context.run_config)
    class_names = list(instruction.class_names)

    # Validate before use: architecture, class count and every tensor shape (ClassifierFormatError).
    blob = model_blob(msg.content)
    model = classifier_from_bytes(blob, expected_num_classes=len(class_names), expected_class_names=class_names)
    weights_path = keep_model(node, blob)

    _, test_samples, _ = node.load_split(class_names, instruction.seed)
    # The training recipe's test transform, as the server sent it (a server that sends none: the standard one).
    preprocessing = (Preprocessing.from_config(instruction.preprocessing) if instruction.preprocessing
                     else standard_preprocessing(instruction.image_size))
    dataset = ImageListDataset.from_samples(test_samples, class_names, preprocessing.transform(),
                                            skip_unreadable=True)
    result = evaluate_classifier(model, dataset, len(class_names), batch_size=64, device=resolve_device(node.device))
    log.info("client %s: test accuracy %.4f on %d images (%d unreadable skipped); weights saved to %s",
             node.name, result.accuracy, result.n, result.unreadable, weights_path)
    evaluation = Evaluation(client_name=node.name, accuracy=result.accuracy, num_examples=result.n,
                            per_class=result.per_class_accuracy, unreadable_images=result.unreadable)
    return Message(content=evaluation.to_record(), reply_to=msg)


def keep_model(node: NodeSettings, blob: bytes) -> Path:
    """Save the received weights (already validated) in the client's output dir; returns their path."""
    weights_path = node.output_dir / WEIGHTS_FILE
    node.output_dir.mkdir(parents=True, exist_ok=True)
    if node.shared_dir is not None:  # one copy for all the clients of a simulation, not one each
        write_shared_copy(weights_path, blob, node.shared_dir / SHARED_MODELS_DIR)
    else:
        atomic_write_bytes(weights_path, blob)
    return weights_path


def _reply_or_failure(msg: Message, context: Context, stage: str,
                      handler: Callable[[Message, Context], Message]) -> Message:
    setup_logging()
    try:
        return handler(msg, context)
    except Exception as exc:  # every failure becomes one named line for the server, the traceback stays here
        name = _client_name(context.node_config, context.run_config)
        log.error("client %s: %s failed", name, stage, exc_info=exc)
        failure = ClientFailure(client_name=name, reason=f"{type(exc).__name__}: {exc}", stage=stage)
        return Message(content=failure.to_record(), reply_to=msg)


def _client_name(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """The client's name even when its settings are broken (then from whatever the node config says)."""
    try:
        return NodeSettings.from_context(node_config, run_config).name
    except Exception:  # noqa: BLE001 - a best-effort label for a failure report
        for key in ("name", "client", "data-dir", "partition-id"):
            if node_config.get(key) not in (None, ""):
                value = str(node_config[key]).rstrip("/").rsplit("/", 1)[-1]
                return safe_filename(f"partition-{value}" if key == "partition-id" else value)
        return "unnamed-client"
