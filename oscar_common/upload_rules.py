"""One client's upload and the rules every upload is held to, wherever it is read from.

Two readers apply the same rules (:func:`validate_upload`): :mod:`oscar_common.wire` to an upload that
arrives as Flower records, and :mod:`oscar_server.payload_file` to one the run directory stored. This module
imports no Flower module, so what only reads a run directory (the server stages) never loads Flower.

The upload is minimal by default (docs/privacy.md): class ids and means, plus what the server needs to
validate them (format version, scheme, encoder id, client name, prototypes per class and, when the client
applied differential privacy, its parameters). Label counts, unreadable-image counts and skipped folder
names leave a client only when the run asks for them (``share-counts``) and the client agrees.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import numpy as np

from oscar_common.choices import TRANSPORT_DTYPES
from oscar_common.dp_calibration import MECHANISM, NEIGHBOURING, gaussian_sigma, mean_sensitivity
from oscar_common.files import safe_filename
from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH

if TYPE_CHECKING:
    from oscar_common.wire import TrainInstruction

FORMAT_VERSION = 2
TOKEN_SEQUENCE_LENGTH = CLIP_CONTEXT_LENGTH  # a tokens upload's rows: what Stable Diffusion 1.x/2.x is conditioned on

UPLOAD_ARRAYS = ("class_ids", "means")  # always present
COUNTS_ARRAY = "counts"  # only with share-counts


class PayloadError(ValueError):
    """A client reply (or a stored upload) that does not follow the wire format; the message says why."""


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
    def from_meta(cls, meta: "FieldReader") -> "DpRecord":
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
    def of(cls, instruction: "TrainInstruction", feature_dim: int, max_bytes: int = 0) -> "Expectation":
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


class ArraySource(Protocol):
    """Where an upload's arrays come from: names and declared sizes are read first, each array is decoded
    only once the declared sizes are within the limit."""

    def names(self) -> set[str]: ...

    def declared_size(self, name: str) -> int:
        """Decoded bytes the array claims (dtype x shape), known without decoding it."""

    def decode(self, name: str) -> np.ndarray:
        """The array itself; raises :class:`PayloadError` when it is not what it declared."""


def validate_upload(meta_record: Mapping[str, Any], arrays: ArraySource, expect: Expectation) -> Upload:
    """Check an upload's metadata and arrays against ``expect`` and return it as an :class:`Upload`.

    Raises :class:`PayloadError` naming the first rule that the upload breaks. Sizes are checked on the
    arrays' declared shapes before any array is decoded.
    """
    meta = FieldReader(meta_record, "upload metadata")
    version = meta_record.get("format-version")
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

    allowed = {*UPLOAD_ARRAYS, COUNTS_ARRAY}
    names = set(arrays.names())
    if not set(UPLOAD_ARRAYS) <= names or names - allowed:
        raise PayloadError(f"arrays must be {list(UPLOAD_ARRAYS)} (+ optional '{COUNTS_ARRAY}'); missing "
                           f"{sorted(set(UPLOAD_ARRAYS) - names)}, unexpected {sorted(names - allowed)}")
    # The size bound comes first and reads only declared shapes: nothing large is decoded before it.
    limit = expect.byte_limit
    sizes = {name: arrays.declared_size(name) for name in names}
    if sum(sizes.values()) > limit:
        raise PayloadError(f"upload declares {sum(sizes.values())} bytes of arrays ({sizes}), over the limit of "
                           f"{limit} (max-payload-bytes)")
    decoded = {name: arrays.decode(name) for name in sorted(names)}
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
    if "num-images" in meta_record:
        shared = SharedCounts(num_images=meta.integer("num-images", minimum=0),
                              unreadable_images=meta.integer("unreadable-images", minimum=0),
                              skipped_classes=meta.texts("skipped-classes"))
    return Upload(class_ids=class_ids, means=means, counts=counts, scheme=scheme, encoder_id=encoder_id,
                  client_name=safe_filename(meta.text("client-name")), prototypes_per_class=prototypes,
                  shared=shared, dp=dp, transport_dtype=transport)



def _check_dtype(name: str, array: np.ndarray, dtype: Any) -> None:
    if array.dtype != dtype:
        raise PayloadError(f"{name} must be {np.dtype(dtype).name}, got {array.dtype.name}")



class FieldReader:
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
