"""The wire format of OSCAR's single upload, defined and validated in one place.

A client's reply to the train instruction carries two records:

* ``ArrayRecord`` ``"oscar.payload"`` with exactly three arrays (Flower serialises them with
  ``np.save(allow_pickle=False)``, so nothing on this path is ever unpickled):
    - ``class_ids`` int64 ``[K]``: indices into the server's class list, unique, ascending
    - ``counts``    int64 ``[K]``: number of local training images behind each mean, >= 1
    - ``means``     float32 ``[K, D]`` (``pooled``: D = CLIP projection dim) or
                    ``[K, 77, H]`` (``tokens``: per-token hidden states of SD's text encoder)
* ``ConfigRecord`` ``"oscar.meta"``: format version, scheme, encoder id, client name, image counts.

The server runs :func:`parse_payload` on every reply; a :class:`PayloadError` names what is wrong,
the reply is rejected and the other clients proceed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from oscar_common.files import safe_filename

FORMAT_VERSION = 1
SCHEMES = ("pooled", "tokens")  # the two conditioning schemes (README: "Divergences")
ARRAYS_KEY = "oscar.payload"
META_KEY = "oscar.meta"
ARRAY_NAMES = ("class_ids", "counts", "means")
TOKEN_SEQUENCE_LENGTH = 77  # CLIP's context length, which Stable Diffusion 1.x/2.x is conditioned on


class PayloadError(ValueError):
    """A client reply that does not follow the wire format; the message says why."""


@dataclass
class ClientPayload:
    class_ids: np.ndarray
    counts: np.ndarray
    means: np.ndarray
    scheme: str
    encoder_id: str
    client_name: str
    num_images: int = 0
    unreadable_images: int = 0
    skipped_classes: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_recorddict(self) -> RecordDict:
        arrays = ArrayRecord(
            {
                "class_ids": Array(np.ascontiguousarray(self.class_ids, dtype=np.int64)),
                "counts": Array(np.ascontiguousarray(self.counts, dtype=np.int64)),
                "means": Array(np.ascontiguousarray(self.means, dtype=np.float32)),
            }
        )
        meta = ConfigRecord(
            {
                "format-version": int(self.format_version),
                "scheme": self.scheme,
                "encoder-id": self.encoder_id,
                "client-name": self.client_name,
                "num-images": int(self.num_images),
                "unreadable-images": int(self.unreadable_images),
                "skipped-classes": list(self.skipped_classes),
            }
        )
        return RecordDict({ARRAYS_KEY: arrays, META_KEY: meta})

    @property
    def feature_shape(self) -> list[int]:
        return list(self.means.shape)


@dataclass(frozen=True)
class Expectation:
    """What the server asked for, so a reply can be checked against it."""

    scheme: str
    encoder_id: str
    num_classes: int
    feature_dim: int | None = None  # D (pooled) or H (tokens); None: learn it from the first valid reply
    max_bytes: int = 64 * 1024 * 1024


def wire_size(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower serialises it for transport (sum of its deflated objects)."""
    # Flower 1.42 ships messages as a tree of content-addressed objects; this helper lives in
    # flwr.supercore (not a public module) but is exactly what the transport sends.
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def parse_payload(content: RecordDict, expect: Expectation) -> ClientPayload:
    """Validate a client's reply content and return it as a :class:`ClientPayload`.

    Raises :class:`PayloadError` naming the first rule that the reply breaks.
    """
    records = dict(content.items())
    if ARRAYS_KEY not in content.array_records:
        raise PayloadError(f"missing ArrayRecord '{ARRAYS_KEY}' (got records {sorted(records)})")
    if META_KEY not in content.config_records:
        raise PayloadError(f"missing ConfigRecord '{META_KEY}' (got records {sorted(records)})")
    size = wire_size(content)
    if size > expect.max_bytes:
        raise PayloadError(f"payload is {size} bytes, over the limit of {expect.max_bytes} (max-payload-bytes)")

    meta = content.config_records[META_KEY]
    version = meta.get("format-version")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported format-version {version!r} (this server speaks {FORMAT_VERSION})")
    scheme = meta.get("scheme")
    if scheme != expect.scheme:
        raise PayloadError(f"scheme {scheme!r} does not match the instructed scheme {expect.scheme!r}")
    encoder_id = meta.get("encoder-id")
    if encoder_id != expect.encoder_id:
        raise PayloadError(f"encoder-id {encoder_id!r} does not match the instructed {expect.encoder_id!r}")

    arrays = content.array_records[ARRAYS_KEY]
    names = set(arrays.keys())
    if names != set(ARRAY_NAMES):
        missing, extra = set(ARRAY_NAMES) - names, names - set(ARRAY_NAMES)
        raise PayloadError(f"arrays must be exactly {list(ARRAY_NAMES)}; missing {sorted(missing)}, "
                           f"unexpected {sorted(extra)}")
    try:
        class_ids, counts, means = (arrays[name].numpy() for name in ARRAY_NAMES)
    except Exception as exc:  # a malformed .npy blob; np.load(allow_pickle=False) refuses objects
        raise PayloadError(f"arrays could not be decoded: {exc}") from None

    _check_dtype("class_ids", class_ids, np.int64)
    _check_dtype("counts", counts, np.int64)
    _check_dtype("means", means, np.float32)
    if class_ids.ndim != 1 or counts.ndim != 1:
        raise PayloadError(f"class_ids and counts must be 1-D, got shapes {class_ids.shape}, {counts.shape}")
    k = class_ids.shape[0]
    if k == 0:
        raise PayloadError("no classes uploaded (class_ids is empty)")
    if counts.shape[0] != k or means.shape[0] != k:
        raise PayloadError(f"class_ids ({k}), counts ({counts.shape[0]}) and means ({means.shape[0]}) "
                           "must have the same length")
    if len(np.unique(class_ids)) != k:
        raise PayloadError(f"duplicate class ids: {class_ids.tolist()}")
    if class_ids.min() < 0 or class_ids.max() >= expect.num_classes:
        raise PayloadError(f"class ids must be in [0, {expect.num_classes}), got {class_ids.tolist()}")
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
    if not np.isfinite(means).all():
        raise PayloadError("means contain NaN or Inf")
    flat = means.reshape(k, -1)
    zero_rows = np.flatnonzero(~flat.any(axis=1))
    if len(zero_rows):
        raise PayloadError(f"all-zero mean vector for class ids {class_ids[zero_rows].tolist()}")

    return ClientPayload(
        class_ids=class_ids,
        counts=counts,
        means=means,
        scheme=scheme,
        encoder_id=encoder_id,
        client_name=safe_filename(meta.get("client-name") or "client"),
        num_images=_as_int(meta.get("num-images", 0)),
        unreadable_images=_as_int(meta.get("unreadable-images", 0)),
        skipped_classes=[str(c) for c in (meta.get("skipped-classes") or [])],
    )


def claimed_name(content: RecordDict) -> str | None:
    """The client name a reply states, if any: for log lines about replies that failed validation."""
    meta = content.config_records.get(META_KEY)
    name = meta.get("client-name") if meta is not None else None
    return safe_filename(name) if isinstance(name, str) and name else None


def _check_dtype(name: str, array: np.ndarray, dtype: Any) -> None:
    if array.dtype != dtype:
        raise PayloadError(f"{name} must be {np.dtype(dtype).name}, got {array.dtype.name}")


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PayloadError(f"expected an integer in the metadata, got {value!r}") from None


# --------------------------------------------------------------------------- server -> client
INSTRUCTION_KEY = "oscar.instruction"  # ConfigRecord in the train and evaluate messages
MODEL_KEY = "oscar.model"  # ArrayRecord in the evaluate message
MODEL_ARRAY = "model.safetensors"
EVALUATE_MESSAGE_TYPE = "evaluate.final"


def model_record(safetensors_blob: bytes) -> ArrayRecord:
    """The trained classifier travels as one safetensors file (bytes in a uint8 array)."""
    return ArrayRecord({MODEL_ARRAY: Array(np.frombuffer(safetensors_blob, dtype=np.uint8))})


def model_blob(content: RecordDict) -> bytes:
    """Inverse of :func:`model_record`; raises ``ValueError`` when the message has no model."""
    if MODEL_KEY not in content.array_records or MODEL_ARRAY not in content.array_records[MODEL_KEY]:
        raise ValueError(f"the evaluate message has no '{MODEL_KEY}/{MODEL_ARRAY}' array")
    array = content.array_records[MODEL_KEY][MODEL_ARRAY].numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"the model must be a 1-D uint8 safetensors blob, got {array.dtype} {array.shape}")
    return array.tobytes()
