"""A ClientApp that replies to OSCAR's train message with a deliberately broken payload.

Used only by tests/test_hostile.py, which packs it into a Flower app next to the real OSCAR ServerApp.
The SuperNode's ``--node-config "corruption='nan'"`` picks the defect; ``corruption='none'`` runs the
real OSCAR client. Nothing here is part of the OSCAR package.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from oscar_common.wire import ARRAYS_KEY, INSTRUCTION_KEY, META_KEY, ClientPayload

app = ClientApp()
DIM = 512


def _valid(instruction, name: str) -> ClientPayload:
    k = len(instruction["class-names"])
    rng = np.random.default_rng(0)
    return ClientPayload(class_ids=np.arange(k, dtype=np.int64), counts=np.ones(k, dtype=np.int64),
                         means=rng.standard_normal((k, DIM)).astype(np.float32), scheme=instruction["scheme"],
                         encoder_id=instruction["encoder-id"], client_name=name, num_images=k)


def _corrupt(kind: str, payload: ClientPayload):
    """Return the reply content with one defect (the names match tests/test_hostile.py)."""
    k = len(payload.class_ids)
    if kind == "oversized":
        payload.means = np.ones((k * 20, DIM), dtype=np.float32)  # the size check comes before the shapes
    if kind == "unknown-scheme":
        payload.scheme = "pixels"
    if kind == "future-version":
        payload.format_version = 99
    content = payload.to_recorddict()
    arrays = content.array_records[ARRAYS_KEY]
    broken = {
        "missing-means": lambda: arrays.pop("means"),
        "extra-array": lambda: arrays.__setitem__("raw_images", Array(np.zeros((2, 8, 8), dtype=np.uint8))),
        "float64": lambda: arrays.__setitem__("means", Array(payload.means.astype(np.float64))),
        "wrong-rank": lambda: arrays.__setitem__("means", Array(payload.means.reshape(k, 2, DIM // 2))),
        "wrong-dim": lambda: arrays.__setitem__("means", Array(np.ones((k, 768), dtype=np.float32))),
        "nan": lambda: arrays.__setitem__("means", Array(np.full((k, DIM), np.nan, dtype=np.float32))),
        "inf": lambda: arrays.__setitem__("means", Array(np.full((k, DIM), np.inf, dtype=np.float32))),
        "zero-vector": lambda: arrays.__setitem__("means", Array(np.vstack(
            [payload.means[:-1], np.zeros((1, DIM), dtype=np.float32)]))),
        "duplicate-ids": lambda: arrays.__setitem__("class_ids", Array(np.zeros(k, dtype=np.int64))),
        "out-of-range": lambda: arrays.__setitem__("class_ids", Array(np.arange(k, dtype=np.int64) + 100)),
        "zero-count": lambda: arrays.__setitem__("counts", Array(np.zeros(k, dtype=np.int64))),
        "count-mismatch": lambda: arrays.__setitem__("counts", Array(np.ones(k + 1, dtype=np.int64))),
        "missing-meta": lambda: content.config_records.pop(META_KEY),
    }
    if kind in broken:
        broken[kind]()
    return content


@app.train()
def train(msg: Message, context: Context) -> Message:
    kind = str(context.node_config.get("corruption", "none"))
    if kind == "none":
        from oscar_client.client_app import train as oscar_train

        return oscar_train(msg, context)
    instruction = msg.content.config_records[INSTRUCTION_KEY]
    content = _corrupt(kind, _valid(instruction, str(context.node_config.get("name", kind))))
    return Message(content=content, reply_to=msg)


@app.evaluate("final")
def evaluate_final(msg: Message, context: Context) -> Message:
    from oscar_client.client_app import evaluate_final as oscar_evaluate

    return oscar_evaluate(msg, context)
