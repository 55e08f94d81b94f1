"""The wire format: round trip, wire size, and every validation rule rejecting its own case."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from oscar_common.wire import (
    ARRAYS_KEY,
    META_KEY,
    ClientPayload,
    Expectation,
    PayloadError,
    model_blob,
    model_record,
    parse_payload,
    wire_size,
)

K, D = 3, 512
POOLED = Expectation(scheme="pooled", encoder_id="openai/clip-vit-base-patch32", num_classes=10, feature_dim=D)


def make_payload(**changes) -> ClientPayload:
    rng = np.random.default_rng(0)
    values = dict(
        class_ids=np.array([0, 4, 7], dtype=np.int64),
        counts=np.array([5, 1, 12], dtype=np.int64),
        means=rng.standard_normal((K, D)).astype(np.float32),
        scheme="pooled",
        encoder_id="openai/clip-vit-base-patch32",
        client_name="clipart",
        num_images=18,
    )
    values.update(changes)
    return ClientPayload(**values)


def over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise and deserialise as the transport does (protobuf)."""
    return recorddict_from_proto(recorddict_to_proto(content))


def test_round_trip_keeps_every_field() -> None:
    sent = make_payload(unreadable_images=2, skipped_classes=["unknown-class"])
    got = parse_payload(over_the_wire(sent.to_recorddict()), POOLED)
    np.testing.assert_array_equal(got.class_ids, sent.class_ids)
    np.testing.assert_array_equal(got.counts, sent.counts)
    np.testing.assert_array_equal(got.means, sent.means)
    assert (got.scheme, got.encoder_id, got.client_name) == ("pooled", sent.encoder_id, "clipart")
    assert (got.num_images, got.unreadable_images, got.skipped_classes) == (18, 2, ["unknown-class"])
    assert got.feature_shape == [K, D]


def test_tokens_round_trip() -> None:
    means = np.ones((2, 77, 32), dtype=np.float32)
    sent = make_payload(class_ids=np.array([1, 2]), counts=np.array([1, 1]), means=means, scheme="tokens",
                        encoder_id="CompVis/stable-diffusion-v1-4")
    expect = Expectation(scheme="tokens", encoder_id="CompVis/stable-diffusion-v1-4", num_classes=3, feature_dim=32)
    assert parse_payload(sent.to_recorddict(), expect).feature_shape == [2, 77, 32]


def test_wire_size_is_the_means_plus_a_small_overhead() -> None:
    size = wire_size(make_payload().to_recorddict())
    assert K * D * 4 < size < K * D * 4 + 2048


def _with_arrays(**arrays) -> RecordDict:
    content = make_payload().to_recorddict()
    record = content.array_records[ARRAYS_KEY]
    for name, value in arrays.items():
        if value is None:
            del record[name]
        else:
            record[name] = Array(value)
    return content


def _with_meta(**meta) -> RecordDict:
    content = make_payload().to_recorddict()
    for key, value in meta.items():
        content.config_records[META_KEY][key.replace("_", "-")] = value
    return content


REJECTED = {
    "missing arrays record": (lambda: RecordDict({META_KEY: ConfigRecord({"scheme": "pooled"})}), "missing ArrayRecord"),
    "missing meta record": (lambda: RecordDict({ARRAYS_KEY: ArrayRecord()}), "missing ConfigRecord"),
    "missing means": (lambda: _with_arrays(means=None), "missing ['means']"),
    "extra array": (lambda: _with_arrays(secret=np.zeros(3, dtype=np.float32)), "unexpected ['secret']"),
    "float64 means": (lambda: _with_arrays(means=np.ones((K, D))), "means must be float32"),
    "int32 class ids": (lambda: _with_arrays(class_ids=np.array([0, 1, 2], dtype=np.int32)), "class_ids must be int64"),
    "rank 3 pooled": (lambda: _with_arrays(means=np.ones((K, 2, D), dtype=np.float32)), "rank 2"),
    "wrong dimension": (lambda: _with_arrays(means=np.ones((K, 768), dtype=np.float32)), "dimension 768"),
    "NaN": (lambda: _with_arrays(means=np.full((K, D), np.nan, dtype=np.float32)), "NaN or Inf"),
    "Inf": (lambda: _with_arrays(means=np.full((K, D), np.inf, dtype=np.float32)), "NaN or Inf"),
    "all-zero vector": (lambda: _with_arrays(means=np.vstack([np.ones((2, D)), np.zeros((1, D))]).astype(np.float32)),
                        "all-zero mean vector for class ids [7]"),
    "duplicate ids": (lambda: _with_arrays(class_ids=np.array([1, 1, 2], dtype=np.int64)), "duplicate class ids"),
    "id out of range": (lambda: _with_arrays(class_ids=np.array([0, 1, 10], dtype=np.int64)), "must be in [0, 10)"),
    "negative id": (lambda: _with_arrays(class_ids=np.array([-1, 1, 2], dtype=np.int64)), "must be in [0, 10)"),
    "zero count": (lambda: _with_arrays(counts=np.array([0, 1, 1], dtype=np.int64)), "counts must be >= 1"),
    "length mismatch": (lambda: _with_arrays(counts=np.array([1, 1], dtype=np.int64)), "same length"),
    "empty": (lambda: _with_arrays(class_ids=np.zeros(0, dtype=np.int64), counts=np.zeros(0, dtype=np.int64),
                                   means=np.zeros((0, D), dtype=np.float32)), "no classes"),
    "unknown scheme": (lambda: _with_meta(scheme="pixels"), "scheme 'pixels'"),
    "other encoder": (lambda: _with_meta(encoder_id="someone/else"), "encoder-id 'someone/else'"),
    "future version": (lambda: _with_meta(format_version=99), "format-version 99"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_validation_rejects(case: str) -> None:
    build, message = REJECTED[case]
    with pytest.raises(PayloadError, match=None) as info:
        parse_payload(over_the_wire(build()), POOLED)
    assert message in str(info.value)


def test_oversized_payload_is_rejected_before_decoding() -> None:
    small_limit = Expectation(**{**POOLED.__dict__, "max_bytes": 1000})
    with pytest.raises(PayloadError, match="over the limit of 1000"):
        parse_payload(make_payload().to_recorddict(), small_limit)


def test_client_names_are_made_filesystem_safe() -> None:
    got = parse_payload(_with_meta(client_name="../../etc/passwd"), POOLED)
    assert "/" not in got.client_name and not got.client_name.startswith(".")


def test_model_record_round_trip() -> None:
    blob = bytes(range(256)) * 3
    content = over_the_wire(RecordDict({"oscar.model": model_record(blob)}))
    assert model_blob(content) == blob
    with pytest.raises(ValueError, match="has no"):
        model_blob(RecordDict())
