"""The contract between the OSCAR server and its clients: every message, defined and validated here.

This is the only module that spells message keys. One round trip each way:

========================  =========================  ===============================================
message type              server -> client           client -> server
========================  =========================  ===============================================
``train``                 :class:`TrainInstruction`  :class:`Upload` (or :class:`ClientFailure`)
``evaluate.final``        :class:`EvaluateInstruction` :class:`Evaluation` (or :class:`ClientFailure`)
                          + the model (safetensors)
``query.identify``        (nothing)                  :class:`Identity` (a resumed run finds its clients)
========================  =========================  ===============================================

The upload itself and the rules it is held to are :mod:`oscar_common.upload_rules` (Flower-free, so the
run directory reads stored uploads back under the same rules); this module carries it in Flower records.

Nothing here is ever unpickled: Flower carries arrays as ``.npy`` (``allow_pickle=False``), and the
server checks each array's declared dtype and shape against ``max-payload-bytes`` before decoding it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from oscar_common.choices import SCHEMES, TRANSPORT_DTYPES
from oscar_common.files import safe_filename

# The upload's parts, its rules and their error: defined Flower-free, imported from here by the wire's users.
from oscar_common.upload_rules import (
    FORMAT_VERSION,
    TOKEN_SEQUENCE_LENGTH,
    DpRecord,
    Expectation,
    FieldReader,
    PayloadError,
    SharedCounts,
    Upload,
    check_dp_record,
    upload_size_limit,
    validate_upload,
)

TRAIN_MESSAGE_TYPE = "train"
EVALUATE_MESSAGE_TYPE = "evaluate.final"
IDENTIFY_MESSAGE_TYPE = "query.identify"

INSTRUCTION_KEY = "oscar.instruction"  # ConfigRecord of the train and evaluate messages
UPLOAD_ARRAYS_KEY = "oscar.upload"  # ArrayRecord of the upload
UPLOAD_META_KEY = "oscar.upload-meta"  # ConfigRecord of the upload
MODEL_KEY = "oscar.model"  # ArrayRecord of the evaluate message
MODEL_ARRAY = "model.safetensors"
EVALUATION_KEY = "oscar.evaluation"  # MetricRecord of the evaluate reply
IDENTITY_KEY = "oscar.identity"  # ConfigRecord of the evaluate and identify replies
FAILURE_KEY = "oscar.failure"  # ConfigRecord of a reply that reports a client-side failure

_OLD_META_KEY = "oscar.meta"  # format version 1 (until this release): its metadata record
_OLD_KEYS = ("oscar.payload", _OLD_META_KEY)


# ----------------------------------------------------------------------------- server -> client
@dataclass(frozen=True)
class TrainInstruction:
    """What a client needs to encode its data (the ``train`` message)."""

    scheme: str
    captioner: str
    encoder_id: str
    class_names: tuple[str, ...]
    min_images_per_class: int
    caption_batch_size: int  # 0: the client chooses from its device
    caption_max_tokens: int
    blip2_prompt: str  # the text a BLIP-2 captioner continues (BLIP takes none)
    seed: int
    share_counts: bool = False
    prototypes_per_class: int = 1
    transport_dtype: str = "float32"
    dp_max_epsilon: float = 0.0  # > 0: uploads must be differentially private with at most this epsilon
    format_version: int = FORMAT_VERSION

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "format-version": self.format_version,
            "scheme": self.scheme,
            "captioner": self.captioner,
            "encoder-id": self.encoder_id,
            "class-names": list(self.class_names),
            "min-images-per-class": self.min_images_per_class,
            "caption-batch-size": self.caption_batch_size,
            "caption-max-tokens": self.caption_max_tokens,
            "blip2-prompt": self.blip2_prompt,
            "seed": self.seed,
            "share-counts": self.share_counts,
            "prototypes-per-class": self.prototypes_per_class,
            "transport-dtype": self.transport_dtype,
            "dp-max-epsilon": float(self.dp_max_epsilon),
        })

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "TrainInstruction":
        fields_ = FieldReader(record, "train instruction")
        version = fields_.integer("format-version")
        if version != FORMAT_VERSION:
            raise PayloadError(f"the server speaks wire format {version}, this client {FORMAT_VERSION}: install "
                               "the same release of oscar-flower on the server and the clients")
        instruction = cls(
            scheme=fields_.choice("scheme", SCHEMES),
            captioner=fields_.text("captioner"),
            encoder_id=fields_.text("encoder-id"),
            class_names=tuple(fields_.texts("class-names")),
            min_images_per_class=fields_.integer("min-images-per-class", minimum=1),
            caption_batch_size=fields_.integer("caption-batch-size", minimum=0),
            caption_max_tokens=fields_.integer("caption-max-tokens", minimum=1),
            blip2_prompt=fields_.text("blip2-prompt"),
            seed=fields_.integer("seed"),
            share_counts=fields_.boolean("share-counts"),
            prototypes_per_class=fields_.integer("prototypes-per-class", minimum=1),
            transport_dtype=fields_.choice("transport-dtype", TRANSPORT_DTYPES),
            dp_max_epsilon=fields_.number("dp-max-epsilon", minimum=0.0),
        )
        if not instruction.class_names:
            raise PayloadError("the train instruction has no class names")
        return instruction


@dataclass(frozen=True)
class EvaluateInstruction:
    """How a client evaluates the broadcast model (the ``evaluate.final`` message, next to the weights)."""

    class_names: tuple[str, ...]
    seed: int
    image_size: int
    preprocessing: Mapping[str, Any] = field(default_factory=dict)  # the training recipe's test transform

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "class-names": list(self.class_names),
            "seed": self.seed,
            "classifier-image-size": self.image_size,
            **{f"preprocessing.{key}": value for key, value in self.preprocessing.items()},
        })

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "EvaluateInstruction":
        fields_ = FieldReader(record, "evaluate instruction")
        prefix = "preprocessing."
        return cls(
            class_names=tuple(fields_.texts("class-names")),
            seed=fields_.integer("seed"),
            image_size=fields_.integer("classifier-image-size", minimum=1),
            preprocessing={key[len(prefix):]: value for key, value in record.items() if key.startswith(prefix)},
        )


def model_record(safetensors_blob: bytes) -> ArrayRecord:
    """The trained classifier travels as one safetensors file (bytes in a uint8 array)."""
    return ArrayRecord({MODEL_ARRAY: Array(np.frombuffer(safetensors_blob, dtype=np.uint8))})


def evaluate_content(instruction: EvaluateInstruction, model: ArrayRecord) -> RecordDict:
    """The broadcast: the model (:func:`model_record`) and how to evaluate it."""
    return RecordDict({MODEL_KEY: model, INSTRUCTION_KEY: instruction.to_record()})


def train_content(instruction: TrainInstruction) -> RecordDict:
    return RecordDict({INSTRUCTION_KEY: instruction.to_record()})


def instruction_record(content: RecordDict) -> ConfigRecord:
    if INSTRUCTION_KEY not in content.config_records:
        raise PayloadError(f"message has no '{INSTRUCTION_KEY}' ConfigRecord: is the server an OSCAR server "
                           f"of the same release (wire format {FORMAT_VERSION})?")
    return content.config_records[INSTRUCTION_KEY]


def model_blob(content: RecordDict) -> bytes:
    """The safetensors bytes of the evaluate message; ``PayloadError`` when the message has none."""
    if MODEL_KEY not in content.array_records or MODEL_ARRAY not in content.array_records[MODEL_KEY]:
        raise PayloadError(f"the evaluate message has no '{MODEL_KEY}/{MODEL_ARRAY}' array")
    array = content.array_records[MODEL_KEY][MODEL_ARRAY].numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise PayloadError(f"the model must be a 1-D uint8 safetensors blob, got {array.dtype} {array.shape}")
    return array.tobytes()


# ----------------------------------------------------------------------------- client -> server
def upload_content(upload: Upload) -> RecordDict:
    """An upload as a client sends it: its arrays in one ArrayRecord, its metadata in one ConfigRecord."""
    return RecordDict({UPLOAD_ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in upload.arrays().items()}),
                       UPLOAD_META_KEY: ConfigRecord(upload.meta())})


def wire_size(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower serialises it for transport (sum of its deflated objects)."""
    # Flower 1.42 ships messages as a tree of content-addressed objects; this helper lives in
    # flwr.supercore (not a public module) but is exactly what the transport sends.
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def declared_size(array: Array) -> int:
    """Decoded bytes an array claims (its dtype x shape), read before anything is decoded.

    Flower deduplicates identical chunks on the wire, so a repetitive array can be tiny in transit and
    huge once decoded: the limit must hold on this number, not on :func:`wire_size`.
    """
    try:
        itemsize = np.dtype(str(array.dtype)).itemsize
    except TypeError:
        raise PayloadError(f"array has an unknown dtype {array.dtype!r}") from None
    if any(int(d) < 0 for d in array.shape):
        raise PayloadError(f"array has a negative dimension: {list(array.shape)}")
    return itemsize * math.prod(int(d) for d in array.shape)


class _RecordArrays:
    """The upload's ArrayRecord for :func:`validate_upload`: sizes from each array's declared dtype and shape,
    decoded with ``np.load(allow_pickle=False)`` only when asked, and refused when its bytes or its decoded
    shape are not what it declared."""

    def __init__(self, record: ArrayRecord) -> None:
        self.record = record

    def names(self) -> set[str]:
        return set(self.record.keys())

    def declared_size(self, name: str) -> int:
        return declared_size(self.record[name])

    def decode(self, name: str) -> np.ndarray:
        array = self.record[name]
        declared = declared_size(array)
        if len(array.data) > declared + 1024:  # the .npy header is small; anything else is smuggled
            raise PayloadError(f"array '{name}' carries {len(array.data)} bytes for a declared {declared}")
        try:
            decoded = array.numpy()
        except Exception as exc:  # a malformed .npy blob; np.load(allow_pickle=False) refuses objects
            raise PayloadError(f"array '{name}' could not be decoded: {exc}") from None
        if list(decoded.shape) != [int(d) for d in array.shape]:
            raise PayloadError(f"array '{name}' decodes to shape {list(decoded.shape)}, declared "
                               f"{list(array.shape)}")
        return decoded


def parse_upload(content: RecordDict, expect: Expectation) -> Upload:
    """Validate a client's reply to the train instruction (:func:`validate_upload`'s rules) and return it
    as an :class:`Upload`; :class:`PayloadError` names the first rule that the reply breaks."""
    records = sorted(dict(content.items()))
    if any(old in records for old in _OLD_KEYS):
        raise PayloadError("this is the old upload format (version 1, with counts and folder names): update the "
                           f"client to the server's release of oscar-flower (wire format {FORMAT_VERSION})")
    if UPLOAD_ARRAYS_KEY not in content.array_records:
        raise PayloadError(f"missing ArrayRecord '{UPLOAD_ARRAYS_KEY}' (got records {records})")
    if UPLOAD_META_KEY not in content.config_records:
        raise PayloadError(f"missing ConfigRecord '{UPLOAD_META_KEY}' (got records {records})")
    return validate_upload(content.config_records[UPLOAD_META_KEY],
                           _RecordArrays(content.array_records[UPLOAD_ARRAYS_KEY]), expect)


@dataclass
class ClientFailure:
    """A client that could not do what it was asked replies with this instead of raising, so the server
    can name it and give a one-line reason (the traceback stays in the client's own log)."""

    client_name: str
    reason: str
    stage: str  # "upload" or "evaluation"

    def to_record(self) -> RecordDict:
        return RecordDict({FAILURE_KEY: ConfigRecord({"client-name": self.client_name, "stage": self.stage,
                                                       "reason": one_line(self.reason)})})

    @classmethod
    def from_content(cls, content: RecordDict) -> "ClientFailure | None":
        record = content.config_records.get(FAILURE_KEY)
        if record is None:
            return None
        return cls(client_name=safe_filename(str(record.get("client-name") or "client")),
                   reason=one_line(str(record.get("reason") or "no reason given")), stage=str(record.get("stage")))


@dataclass
class Evaluation:
    """A client's result on its own test split (the reply to ``evaluate.final``)."""

    client_name: str
    accuracy: float
    num_examples: int
    per_class: dict[int, float]
    unreadable_images: int = 0

    def to_record(self) -> RecordDict:
        present = sorted(self.per_class)
        metrics = MetricRecord({
            "accuracy": float(self.accuracy), "num-examples": int(self.num_examples),
            "per-class-ids": [int(c) for c in present], "per-class-accuracy": [float(self.per_class[c]) for c in present],
            "unreadable-images": int(self.unreadable_images),
        })
        return RecordDict({EVALUATION_KEY: metrics, IDENTITY_KEY: ConfigRecord({"client-name": self.client_name})})

    @classmethod
    def from_content(cls, content: RecordDict, num_classes: int) -> "Evaluation":
        if EVALUATION_KEY not in content.metric_records:
            raise PayloadError(f"evaluation reply has no '{EVALUATION_KEY}' MetricRecord")
        metrics = content.metric_records[EVALUATION_KEY]
        ids = [int(c) for c in metrics.get("per-class-ids", [])]
        if any(not 0 <= c < num_classes for c in ids):
            raise PayloadError(f"per-class ids out of range: {ids}")
        accuracy = float(metrics["accuracy"])
        if not 0.0 <= accuracy <= 1.0:
            raise PayloadError(f"accuracy {accuracy} is not in [0, 1]")
        return cls(client_name=Identity.from_content(content).client_name, accuracy=accuracy,
                   num_examples=int(metrics["num-examples"]),
                   per_class=dict(zip(ids, (float(a) for a in metrics.get("per-class-accuracy", [])))),
                   unreadable_images=int(metrics.get("unreadable-images", 0)))


@dataclass
class Identity:
    """Who a node is (its client name): the reply to ``query.identify``, also part of an evaluation."""

    client_name: str

    def to_record(self) -> RecordDict:
        return RecordDict({IDENTITY_KEY: ConfigRecord({"client-name": self.client_name})})

    @classmethod
    def from_content(cls, content: RecordDict) -> "Identity":
        record = content.config_records.get(IDENTITY_KEY)
        if record is None or not record.get("client-name"):
            raise PayloadError(f"reply has no '{IDENTITY_KEY}' client name")
        return cls(client_name=safe_filename(str(record["client-name"])))


# ----------------------------------------------------------------------------- helpers
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(text: str, limit: int = 300) -> str:
    """A reason fit for a report cell: colour codes removed and, for a traceback, its last line only."""
    lines = [line.strip() for line in _ANSI.sub("", str(text)).splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        # the exception line is the last line that is not a frame or a caret marker
        exception_lines = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
        line = exception_lines[-1] if exception_lines else lines[-1]
    else:
        line = " ".join(lines)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def claimed_name(content: RecordDict) -> str | None:
    """The client name a reply states, if any: for log lines about replies that failed validation."""
    for key in (UPLOAD_META_KEY, IDENTITY_KEY, FAILURE_KEY, _OLD_META_KEY):
        record = content.config_records.get(key)
        name = record.get("client-name") if record is not None else None
        if isinstance(name, str) and name:
            return safe_filename(name)
    return None
