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

The upload is minimal by default (issue "privacy"): class ids and means, plus what the server needs to
validate them (format version, scheme, encoder id, client name, prototypes per class and, when the client
applied differential privacy, its parameters). Label counts, unreadable-image counts and skipped folder
names leave a client only when the run asks for them (``share-counts``) and the client agrees.

Nothing here is ever unpickled: Flower carries arrays as ``.npy`` (``allow_pickle=False``), and the
server checks each array's declared dtype and shape against ``max-payload-bytes`` before decoding it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from oscar_common.choices import SCHEMES, TRANSPORT_DTYPES
from oscar_common.dp_calibration import MECHANISM, NEIGHBOURING, gaussian_sigma, mean_sensitivity
from oscar_common.files import safe_filename

FORMAT_VERSION = 2
TOKEN_SEQUENCE_LENGTH = 77  # CLIP's context length, which Stable Diffusion 1.x/2.x is conditioned on

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

UPLOAD_ARRAYS = ("class_ids", "means")  # always present
COUNTS_ARRAY = "counts"  # only with share-counts
_OLD_META_KEY = "oscar.meta"  # format version 1 (until this release): its metadata record
_OLD_KEYS = ("oscar.payload", _OLD_META_KEY)


class PayloadError(ValueError):
    """A client reply that does not follow the wire format; the message says why."""


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
        fields_ = _Fields(record, "train instruction")
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
        fields_ = _Fields(record, "evaluate instruction")
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
@dataclass
class DpRecord:
    """What a client states about the differential privacy it applied (oscar_client.privacy makes it)."""

    mechanism: str
    neighbouring: str
    epsilon: float
    delta: float
    sigma: float
    sensitivity: float
    clip_norm: float
    min_images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_meta(self) -> dict[str, Any]:
        return {f"dp-{key.replace('_', '-')}": value for key, value in self.as_dict().items()}

    @classmethod
    def from_meta(cls, meta: "_Fields") -> "DpRecord":
        return cls(mechanism=meta.text("dp-mechanism"), neighbouring=meta.text("dp-neighbouring"),
                   epsilon=meta.number("dp-epsilon", minimum=0.0, strict=True),
                   delta=meta.number("dp-delta", minimum=0.0, strict=True, maximum=1.0),
                   sigma=meta.number("dp-sigma", minimum=0.0, strict=True),
                   sensitivity=meta.number("dp-sensitivity", minimum=0.0, strict=True),
                   clip_norm=meta.number("dp-clip-norm", minimum=0.0, strict=True),
                   min_images=meta.integer("dp-min-images", minimum=1))


# Relative slack between a declared and a recomputed sigma or sensitivity: float round-off and root-finder
# tolerance (1e-12 in dp-accounting) are far below it; an understated sigma of 1e-6 moves epsilon by ~1e-6.
DP_RECORD_TOLERANCE = 1e-6


def check_dp_record(dp: DpRecord, min_images_per_class: int) -> None:
    """Raise :class:`PayloadError` unless ``dp`` adds up under the calibration the clients use
    (:mod:`oscar_common.dp_calibration`): a mechanism the server can check, ``n_pub`` (``min_images``) at
    least the server's ``min-images-per-class``, sensitivity ``2C/n_pub`` and the sigma that gives the
    declared (epsilon, delta). Otherwise the epsilon in the report would be whatever the client wrote."""
    if (dp.mechanism, dp.neighbouring) != (MECHANISM, NEIGHBOURING):
        raise PayloadError(f"DP record: mechanism {dp.mechanism!r} under {dp.neighbouring!r} neighbours is not "
                           f"one this server can check (it checks {MECHANISM!r} under {NEIGHBOURING!r})")
    if dp.min_images < min_images_per_class:
        raise PayloadError(f"DP record: calibrated to {dp.min_images} images per class, below the server's "
                           f"min-images-per-class {min_images_per_class}: the noise is too small for the classes "
                           "the server accepts")
    try:
        sensitivity = mean_sensitivity(clip_norm=dp.clip_norm, min_images=dp.min_images)
        sigma = gaussian_sigma(dp.epsilon, dp.delta, sensitivity)
    except ValueError as exc:
        raise PayloadError(f"DP record: {exc}") from None
    if not math.isclose(dp.sensitivity, sensitivity, rel_tol=DP_RECORD_TOLERANCE):
        raise PayloadError(f"DP record: sensitivity {dp.sensitivity:.6g} does not add up: clip norm "
                           f"{dp.clip_norm:g} over {dp.min_images} images per class gives 2C/n = {sensitivity:.6g}")
    if not math.isclose(dp.sigma, sigma, rel_tol=DP_RECORD_TOLERANCE):
        raise PayloadError(f"DP record: sigma {dp.sigma:.6g} does not add up: epsilon {dp.epsilon:g}, delta "
                           f"{dp.delta:g} and sensitivity {sensitivity:.6g} need sigma {sigma:.6g}")


@dataclass
class SharedCounts:
    """Counts a client shares only with ``share-counts`` (the paper's weighted tables need them)."""

    num_images: int
    unreadable_images: int
    skipped_classes: list[str]


@dataclass
class Upload:
    """One client's single upload: per-class means (several rows per class with k prototypes)."""

    class_ids: np.ndarray  # int64 [M], ascending; a class repeats only with prototypes_per_class > 1
    means: np.ndarray  # float32 [M, D] (pooled) or [M, 77, H] (tokens)
    scheme: str
    encoder_id: str
    client_name: str
    prototypes_per_class: int = 1
    counts: np.ndarray | None = None  # int64 [M], images behind each row (share-counts)
    shared: SharedCounts | None = None  # (share-counts)
    dp: DpRecord | None = None
    transport_dtype: str = "float32"
    format_version: int = FORMAT_VERSION

    @property
    def feature_shape(self) -> list[int]:
        return list(self.means.shape)

    @property
    def classes(self) -> list[int]:
        """The distinct class ids, ascending."""
        return sorted(set(self.class_ids.tolist()))

    def meta(self) -> dict[str, Any]:
        """The upload's metadata as the wire carries it (also what the run directory stores)."""
        meta: dict[str, Any] = {
            "format-version": int(self.format_version),
            "scheme": self.scheme,
            "encoder-id": self.encoder_id,
            "client-name": self.client_name,
            "prototypes-per-class": int(self.prototypes_per_class),
            "transport-dtype": self.transport_dtype,
            "dp": self.dp is not None,
        }
        if self.dp is not None:
            meta.update(self.dp.to_meta())
        if self.shared is not None:
            meta.update({"num-images": int(self.shared.num_images),
                         "unreadable-images": int(self.shared.unreadable_images),
                         "skipped-classes": list(self.shared.skipped_classes)})
        return meta

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"class_ids": np.ascontiguousarray(self.class_ids, dtype=np.int64),
                  "means": np.ascontiguousarray(self.means, dtype=np.dtype(self.transport_dtype))}
        if self.counts is not None:
            arrays[COUNTS_ARRAY] = np.ascontiguousarray(self.counts, dtype=np.int64)
        return arrays

    def to_record(self) -> RecordDict:
        return RecordDict({UPLOAD_ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in self.arrays().items()}),
                           UPLOAD_META_KEY: ConfigRecord(self.meta())})


@dataclass(frozen=True)
class Expectation:
    """What the server asked for, so a reply can be checked against it."""

    scheme: str
    encoder_id: str
    num_classes: int
    feature_dim: int | None = None  # D (pooled) or H (tokens); None: learn it from the first valid reply
    max_bytes: int = 0  # 0: exactly what a valid upload of this shape can need (:func:`upload_size_limit`)
    prototypes_per_class: int = 1
    transport_dtype: str = "float32"
    dp_max_epsilon: float = 0.0
    min_images_per_class: int = 1  # the server's: a DP record must be calibrated to at least this many images

    @classmethod
    def of(cls, instruction: TrainInstruction, feature_dim: int, max_bytes: int = 0) -> "Expectation":
        return cls(scheme=instruction.scheme, encoder_id=instruction.encoder_id,
                   num_classes=len(instruction.class_names), feature_dim=feature_dim, max_bytes=max_bytes,
                   prototypes_per_class=instruction.prototypes_per_class,
                   transport_dtype=instruction.transport_dtype, dp_max_epsilon=instruction.dp_max_epsilon,
                   min_images_per_class=instruction.min_images_per_class)

    @property
    def byte_limit(self) -> int:
        return self.max_bytes or upload_size_limit(self.scheme, self.num_classes, self.feature_dim or 4096,
                                                   self.prototypes_per_class)


def upload_size_limit(scheme: str, num_classes: int, feature_dim: int, prototypes_per_class: int = 1) -> int:
    """The largest decoded size a valid upload can have (float32 means, counts, ids), plus 1 MiB of slack.

    The default ``max-payload-bytes`` (0) uses this, so the limit grows with the class count: 345 DomainNet
    classes under ``tokens`` (77 x 768 float32 per class, 81.6 MB) are accepted, a hostile 10x that is not.
    """
    rows = num_classes * prototypes_per_class
    per_row = feature_dim * (TOKEN_SEQUENCE_LENGTH if scheme == "tokens" else 1) * 4 + 8 + 8
    return rows * per_row + (1 << 20)


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


def parse_upload(content: RecordDict, expect: Expectation) -> Upload:
    """Validate a client's reply to the train instruction and return it as an :class:`Upload`.

    Raises :class:`PayloadError` naming the first rule that the reply breaks. Sizes are checked on the
    arrays' declared shapes before any array is decoded.
    """
    records = sorted(dict(content.items()))
    if any(old in records for old in _OLD_KEYS):
        raise PayloadError("this is the old upload format (version 1, with counts and folder names): update the "
                           f"client to the server's release of oscar-flower (wire format {FORMAT_VERSION})")
    if UPLOAD_ARRAYS_KEY not in content.array_records:
        raise PayloadError(f"missing ArrayRecord '{UPLOAD_ARRAYS_KEY}' (got records {records})")
    if UPLOAD_META_KEY not in content.config_records:
        raise PayloadError(f"missing ConfigRecord '{UPLOAD_META_KEY}' (got records {records})")
    meta = _Fields(content.config_records[UPLOAD_META_KEY], "upload metadata")

    version = content.config_records[UPLOAD_META_KEY].get("format-version")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported format-version {version!r} (this server speaks {FORMAT_VERSION})")
    scheme = meta.text("scheme")
    if scheme != expect.scheme:
        raise PayloadError(f"scheme {scheme!r} does not match the instructed scheme {expect.scheme!r}")
    encoder_id = meta.text("encoder-id")
    if encoder_id != expect.encoder_id:
        raise PayloadError(f"encoder-id {encoder_id!r} does not match the instructed {expect.encoder_id!r}")
    transport = meta.choice("transport-dtype", TRANSPORT_DTYPES)
    prototypes = meta.integer("prototypes-per-class", minimum=1)
    if prototypes > expect.prototypes_per_class:
        raise PayloadError(f"{prototypes} prototypes per class, the server asked for at most "
                           f"{expect.prototypes_per_class}")

    arrays = content.array_records[UPLOAD_ARRAYS_KEY]
    allowed = {*UPLOAD_ARRAYS, COUNTS_ARRAY}
    names = set(arrays.keys())
    if not set(UPLOAD_ARRAYS) <= names or names - allowed:
        raise PayloadError(f"arrays must be {list(UPLOAD_ARRAYS)} (+ optional '{COUNTS_ARRAY}'); missing "
                           f"{sorted(set(UPLOAD_ARRAYS) - names)}, unexpected {sorted(names - allowed)}")
    # The size bound comes first and reads only declared shapes: nothing large is decoded before it.
    limit = expect.byte_limit
    sizes = {name: declared_size(arrays[name]) for name in names}
    if sum(sizes.values()) > limit:
        raise PayloadError(f"upload declares {sum(sizes.values())} bytes of arrays ({sizes}), over the limit of "
                           f"{limit} (max-payload-bytes)")
    for name in names:
        if len(arrays[name].data) > sizes[name] + 1024:  # the .npy header is small; anything else is smuggled
            raise PayloadError(f"array '{name}' carries {len(arrays[name].data)} bytes for a declared "
                               f"{sizes[name]}")
    decoded = {}
    for name in sorted(names):
        try:
            decoded[name] = arrays[name].numpy()
        except Exception as exc:  # a malformed .npy blob; np.load(allow_pickle=False) refuses objects
            raise PayloadError(f"array '{name}' could not be decoded: {exc}") from None
        if list(decoded[name].shape) != [int(d) for d in arrays[name].shape]:
            raise PayloadError(f"array '{name}' decodes to shape {list(decoded[name].shape)}, declared "
                               f"{list(arrays[name].shape)}")
    class_ids, means, counts = decoded["class_ids"], decoded["means"], decoded.get(COUNTS_ARRAY)

    _check_dtype("class_ids", class_ids, np.int64)
    _check_dtype("means", means, np.dtype(transport))
    if class_ids.ndim != 1:
        raise PayloadError(f"class_ids must be 1-D, got shape {list(class_ids.shape)}")
    m = class_ids.shape[0]
    if m == 0:
        raise PayloadError("no classes uploaded (class_ids is empty)")
    if means.shape[0] != m:
        raise PayloadError(f"class_ids ({m}) and means ({means.shape[0]}) must have the same length")
    if class_ids.min() < 0 or class_ids.max() >= expect.num_classes:
        raise PayloadError(f"class ids must be in [0, {expect.num_classes}), got {class_ids.tolist()}")
    if np.any(np.diff(class_ids) < 0):
        raise PayloadError(f"class ids must be ascending, got {class_ids.tolist()}")
    _, per_class = np.unique(class_ids, return_counts=True)
    if per_class.max() > prototypes:
        if prototypes == 1:
            raise PayloadError(f"duplicate class ids: {class_ids.tolist()}")
        raise PayloadError(f"more than {prototypes} rows for one class: {class_ids.tolist()}")
    if counts is not None:
        _check_dtype("counts", counts, np.int64)
        if counts.shape != (m,):
            raise PayloadError(f"counts must have shape [{m}] like class_ids, got {list(counts.shape)}")
        if counts.min() < 1:
            raise PayloadError(f"counts must be >= 1, got {counts.tolist()}")

    expected_rank = 2 if expect.scheme == "pooled" else 3
    if means.ndim != expected_rank:
        raise PayloadError(f"means must have rank {expected_rank} for scheme {expect.scheme!r}, "
                           f"got shape {list(means.shape)}")
    if expect.scheme == "tokens" and means.shape[1] != TOKEN_SEQUENCE_LENGTH:
        raise PayloadError(f"token means must have {TOKEN_SEQUENCE_LENGTH} positions, got {means.shape[1]}")
    if expect.feature_dim is not None and means.shape[-1] != expect.feature_dim:
        raise PayloadError(f"means have dimension {means.shape[-1]}, the encoder {expect.encoder_id!r} "
                           f"produces {expect.feature_dim}")
    means = means.astype(np.float32)
    if not np.isfinite(means).all():
        raise PayloadError("means contain NaN or Inf")
    zero_rows = np.flatnonzero(~means.reshape(m, -1).any(axis=1))
    if len(zero_rows):
        raise PayloadError(f"all-zero mean vector for class ids {class_ids[zero_rows].tolist()}")

    dp = DpRecord.from_meta(meta) if meta.boolean("dp") else None
    if dp is not None:
        check_dp_record(dp, expect.min_images_per_class)
    if expect.dp_max_epsilon > 0:
        if dp is None:
            raise PayloadError(f"the server requires differential privacy (dp-max-epsilon={expect.dp_max_epsilon}); "
                               "this upload is not private: set dp-epsilon in the client's node config")
        if dp.epsilon > expect.dp_max_epsilon + 1e-12:
            raise PayloadError(f"dp-epsilon {dp.epsilon} is above the server's maximum {expect.dp_max_epsilon}")
    shared = None
    if "num-images" in content.config_records[UPLOAD_META_KEY]:
        shared = SharedCounts(num_images=meta.integer("num-images", minimum=0),
                              unreadable_images=meta.integer("unreadable-images", minimum=0),
                              skipped_classes=meta.texts("skipped-classes"))
    return Upload(class_ids=class_ids, means=means, counts=counts, scheme=scheme, encoder_id=encoder_id,
                  client_name=safe_filename(meta.text("client-name")), prototypes_per_class=prototypes,
                  shared=shared, dp=dp, transport_dtype=transport)


def upload_from_stored(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Upload:
    """An :class:`Upload` from what the run directory stored (the wire's arrays and metadata, as given)."""
    content = RecordDict({UPLOAD_ARRAYS_KEY: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          UPLOAD_META_KEY: ConfigRecord(dict(meta))})
    means = arrays["means"]
    expect = Expectation(scheme=str(meta["scheme"]), encoder_id=str(meta["encoder-id"]),
                         num_classes=int(np.max(arrays["class_ids"])) + 1, feature_dim=int(means.shape[-1]),
                         max_bytes=sum(int(np.asarray(a).nbytes) for a in arrays.values()) + 1,
                         prototypes_per_class=int(meta.get("prototypes-per-class", 1)),
                         transport_dtype=str(means.dtype))
    return parse_upload(content, expect)


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


def _check_dtype(name: str, array: np.ndarray, dtype: Any) -> None:
    if array.dtype != dtype:
        raise PayloadError(f"{name} must be {np.dtype(dtype).name}, got {array.dtype.name}")


class _Fields:
    """Typed reads of a ConfigRecord, each failure a PayloadError naming the key."""

    def __init__(self, record: Mapping[str, Any], what: str) -> None:
        self.record, self.what = record, what

    def _get(self, key: str) -> Any:
        if key not in self.record:
            raise PayloadError(f"{self.what}: missing '{key}'")
        return self.record[key]

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise PayloadError(f"{self.what}: '{key}' must be text, got {value!r}")
        return value

    def texts(self, key: str) -> list[str]:
        value = self._get(key)
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise PayloadError(f"{self.what}: '{key}' must be a list of text, got {value!r}")
        return [str(v) for v in value]

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in allowed:
            raise PayloadError(f"{self.what}: '{key}' must be one of {allowed}, got {value!r}")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise PayloadError(f"{self.what}: '{key}' must be true or false, got {value!r}")
        return value

    def integer(self, key: str, minimum: int | None = None) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PayloadError(f"{self.what}: '{key}' must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise PayloadError(f"{self.what}: '{key}' must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, minimum: float | None = None, maximum: float | None = None,
               strict: bool = False) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PayloadError(f"{self.what}: '{key}' must be a finite number, got {value!r}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise PayloadError(f"{self.what}: '{key}' must be {'>' if strict else '>='} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise PayloadError(f"{self.what}: '{key}' must be <= {maximum}, got {value}")
        return float(value)
