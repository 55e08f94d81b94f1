"""A ClientApp that replies to OSCAR's train message with a deliberately broken upload.

Used only by tests/e2e/test_hostile.py, which packs it into a Flower app next to the real OSCAR ServerApp.
The SuperNode's ``--node-config "corruption='nan'"`` picks the defect; ``corruption='none'`` runs the
real OSCAR client. Nothing here is part of the OSCAR package.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from oscar_common.wire import (
    UPLOAD_ARRAYS_KEY,
    UPLOAD_META_KEY,
    TrainInstruction,
    Upload,
    instruction_record,
    upload_content,
)

app = ClientApp()
DIM = 512


def _valid(instruction: TrainInstruction, name: str) -> Upload:
    k = len(instruction.class_names)
    rng = np.random.default_rng(0)
    return Upload(class_ids=np.arange(k, dtype=np.int64), means=rng.standard_normal((k, DIM)).astype(np.float32),
                  scheme=instruction.scheme, encoder_id=instruction.encoder_id, client_name=name)


def _corrupt(kind: str, upload: Upload) -> RecordDict:
    """The reply content with one defect (the names match tests/e2e/test_hostile.py)."""
    k = len(upload.class_ids)
    if kind == "repetitive-huge":  # 40 MiB of ones decoded; Flower ships identical chunks once
        upload.means = np.ones((k, 4096 * 32, DIM // 64), dtype=np.float32)
    if kind == "unknown-scheme":
        upload.scheme = "pixels"
    if kind == "old-format":
        return RecordDict({"oscar.payload": ArrayRecord({"means": Array(upload.means)}),
                           "oscar.meta": ConfigRecord({"format-version": 1})})
    content = upload_content(upload)
    arrays = content.array_records[UPLOAD_ARRAYS_KEY]
    broken = {
        "extra-array": lambda: arrays.__setitem__("raw_images", Array(np.zeros((2, 8, 8), dtype=np.uint8))),
        "wrong-dim": lambda: arrays.__setitem__("means", Array(np.ones((k, 768), dtype=np.float32))),
        "nan": lambda: arrays.__setitem__("means", Array(np.full((k, DIM), np.nan, dtype=np.float32))),
        "duplicate-ids": lambda: arrays.__setitem__("class_ids", Array(np.zeros(k, dtype=np.int64))),
        "missing-meta": lambda: content.config_records.pop(UPLOAD_META_KEY),
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
    instruction = TrainInstruction.from_record(instruction_record(msg.content))
    content = _corrupt(kind, _valid(instruction, str(context.node_config.get("name", kind))))
    return Message(content=content, reply_to=msg)


@app.evaluate("final")
def evaluate_final(msg: Message, context: Context) -> Message:
    from oscar_client.client_app import evaluate_final as oscar_evaluate

    return oscar_evaluate(msg, context)
