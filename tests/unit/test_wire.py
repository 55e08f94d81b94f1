"""The wire contract: round trips, sizes, every validation rule rejecting its own case, and that this module
is the only one that spells message keys."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from oscar_common import wire
from oscar_common.config import OscarConfig
from oscar_common.dp_calibration import MECHANISM, NEIGHBOURING, gaussian_sigma, mean_sensitivity
from oscar_common.wire import (
    UPLOAD_ARRAYS_KEY,
    UPLOAD_META_KEY,
    ClientFailure,
    DpRecord,
    EvaluateInstruction,
    Evaluation,
    Expectation,
    Identity,
    PayloadError,
    SharedCounts,
    TrainInstruction,
    Upload,
    declared_size,
    model_blob,
    model_record,
    one_line,
    parse_upload,
    upload_content,
    upload_size_limit,
    wire_size,
)

K, D = 3, 512
CLIP = "openai/clip-vit-base-patch32"
POOLED = Expectation(scheme="pooled", encoder_id=CLIP, num_classes=10, feature_dim=D)
PROJECT = Path(__file__).resolve().parents[2]


def make_upload(**changes) -> Upload:
    rng = np.random.default_rng(0)
    values = dict(class_ids=np.array([0, 4, 7], dtype=np.int64), means=rng.standard_normal((K, D)).astype(np.float32),
                  scheme="pooled", encoder_id=CLIP, client_name="clipart")
    values.update(changes)
    return Upload(**values)


def over_the_wire(content: RecordDict) -> RecordDict:
    """Serialise and deserialise as the transport does (protobuf)."""
    return recorddict_from_proto(recorddict_to_proto(content))


def test_default_upload_carries_only_ids_means_and_what_validation_needs() -> None:
    content = over_the_wire(upload_content(make_upload()))
    assert sorted(content.array_records[UPLOAD_ARRAYS_KEY].keys()) == ["class_ids", "means"]
    assert set(content.config_records[UPLOAD_META_KEY].keys()) == {
        "format-version", "scheme", "encoder-id", "client-name", "prototypes-per-class", "transport-dtype", "dp"}
    got = parse_upload(content, POOLED)
    np.testing.assert_array_equal(got.means, make_upload().means)
    assert got.counts is None and got.shared is None and got.dp is None


def dp_record(**changes) -> DpRecord:
    """A record that adds up: epsilon 2, delta 1e-5, C = 1, n_pub = 10 (sensitivity 0.2), sigma calibrated."""
    values = dict(mechanism=MECHANISM, neighbouring=NEIGHBOURING, epsilon=2.0, delta=1e-5,
                  sigma=gaussian_sigma(2.0, 1e-5, 0.2), sensitivity=0.2, clip_norm=1.0, min_images=10)
    return DpRecord(**{**values, **changes})


def test_shared_counts_and_dp_round_trip() -> None:
    dp = dp_record()
    sent = make_upload(counts=np.array([5, 12, 30], dtype=np.int64), dp=dp,
                       shared=SharedCounts(num_images=47, unreadable_images=2, skipped_classes=["zebra"]))
    got = parse_upload(over_the_wire(upload_content(sent)), POOLED)
    assert got.dp == dp and got.counts.tolist() == [5, 12, 30]
    assert (got.shared.num_images, got.shared.unreadable_images, got.shared.skipped_classes) == (47, 2, ["zebra"])


def test_tokens_round_trip_in_float16() -> None:
    means = np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32)
    sent = make_upload(class_ids=np.array([1, 2]), means=means, scheme="tokens", encoder_id="sd",
                       transport_dtype="float16")
    expect = Expectation(scheme="tokens", encoder_id="sd", num_classes=3, feature_dim=32, transport_dtype="float16")
    content = over_the_wire(upload_content(sent))
    assert content.array_records[UPLOAD_ARRAYS_KEY]["means"].dtype == "float16"
    got = parse_upload(content, expect)
    assert got.means.dtype == np.float32 and got.feature_shape == [2, 77, 32]
    np.testing.assert_allclose(got.means, means, rtol=1e-3, atol=1e-3)
    assert wire_size(content) < 2 * 77 * 32 * 2 + 2048  # half of float32's bytes, plus framing


def test_prototypes_repeat_a_class_up_to_k_times() -> None:
    means = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    upload = make_upload(class_ids=np.array([0, 0, 3, 3]), means=means, prototypes_per_class=2)
    expect = Expectation(**{**POOLED.__dict__, "prototypes_per_class": 2})
    assert parse_upload(over_the_wire(upload_content(upload)), expect).classes == [0, 3]
    with pytest.raises(PayloadError, match="more than 2 rows for one class"):
        three = make_upload(class_ids=np.array([0, 0, 0]), means=means[:3], prototypes_per_class=2)
        parse_upload(upload_content(three), expect)
    with pytest.raises(PayloadError, match="at most 1"):
        parse_upload(upload_content(upload), POOLED)


def test_wire_size_is_the_means_plus_a_small_overhead() -> None:
    size = wire_size(upload_content(make_upload()))
    assert K * D * 4 < size < K * D * 4 + 2048


def _with_arrays(**arrays) -> RecordDict:
    content = upload_content(make_upload())
    record = content.array_records[UPLOAD_ARRAYS_KEY]
    for name, value in arrays.items():
        if value is None:
            del record[name]
        else:
            record[name] = Array(value)
    return content


def _with_meta(**meta) -> RecordDict:
    content = upload_content(make_upload())
    for key, value in meta.items():
        content.config_records[UPLOAD_META_KEY][key.replace("_", "-")] = value
    return content


REJECTED = {
    "missing arrays record": (lambda: RecordDict({UPLOAD_META_KEY: ConfigRecord({"scheme": "pooled"})}),
                              "missing ArrayRecord"),
    "missing meta record": (lambda: RecordDict({UPLOAD_ARRAYS_KEY: ArrayRecord()}), "missing ConfigRecord"),
    "old format": (lambda: RecordDict({"oscar.payload": ArrayRecord(), "oscar.meta": ConfigRecord({})}),
                   "old upload format (version 1"),
    "missing means": (lambda: _with_arrays(means=None), "missing ['means']"),
    "extra array": (lambda: _with_arrays(secret=np.zeros(3, dtype=np.float32)), "unexpected ['secret']"),
    "float64 means": (lambda: _with_arrays(means=np.ones((K, D))), "means must be float32"),
    "float16 not instructed": (lambda: _with_arrays(means=np.ones((K, D), dtype=np.float16)), "means must be float32"),
    "int32 class ids": (lambda: _with_arrays(class_ids=np.array([0, 1, 2], dtype=np.int32)), "class_ids must be int64"),
    "rank 3 pooled": (lambda: _with_arrays(means=np.ones((K, 2, D), dtype=np.float32)), "rank 2"),
    "wrong dimension": (lambda: _with_arrays(means=np.ones((K, 768), dtype=np.float32)), "dimension 768"),
    "NaN": (lambda: _with_arrays(means=np.full((K, D), np.nan, dtype=np.float32)), "NaN or Inf"),
    "Inf": (lambda: _with_arrays(means=np.full((K, D), np.inf, dtype=np.float32)), "NaN or Inf"),
    "all-zero vector": (lambda: _with_arrays(means=np.vstack([np.ones((2, D)), np.zeros((1, D))]).astype(np.float32)),
                        "all-zero mean vector for class ids [7]"),
    "duplicate ids": (lambda: _with_arrays(class_ids=np.array([1, 1, 2], dtype=np.int64)), "duplicate class ids"),
    "unsorted ids": (lambda: _with_arrays(class_ids=np.array([2, 1, 3], dtype=np.int64)), "must be ascending"),
    "id out of range": (lambda: _with_arrays(class_ids=np.array([0, 1, 10], dtype=np.int64)), "must be in [0, 10)"),
    "negative id": (lambda: _with_arrays(class_ids=np.array([-1, 1, 2], dtype=np.int64)), "must be in [0, 10)"),
    "zero count": (lambda: _with_arrays(counts=np.array([0, 1, 1], dtype=np.int64)), "counts must be >= 1"),
    "count length": (lambda: _with_arrays(counts=np.array([1, 1], dtype=np.int64)), "counts must have shape [3]"),
    "length mismatch": (lambda: _with_arrays(class_ids=np.array([1, 2], dtype=np.int64)), "same length"),
    "empty": (lambda: _with_arrays(class_ids=np.zeros(0, dtype=np.int64), means=np.zeros((0, D), dtype=np.float32)),
              "no classes"),
    "unknown scheme": (lambda: _with_meta(scheme="pixels"), "scheme 'pixels'"),
    "other encoder": (lambda: _with_meta(encoder_id="someone/else"), "encoder-id 'someone/else'"),
    "future version": (lambda: _with_meta(format_version=99), "format-version 99"),
    "bad prototypes": (lambda: _with_meta(prototypes_per_class="two"), "'prototypes-per-class' must be an integer"),
    "dp without parameters": (lambda: _with_meta(dp=True), "missing 'dp-mechanism'"),
    "unknown dtype": (lambda: _with_meta(transport_dtype="int8"), "'transport-dtype' must be one of"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_validation_rejects(case: str) -> None:
    build, message = REJECTED[case]
    with pytest.raises(PayloadError) as info:
        parse_upload(over_the_wire(build()), POOLED)
    assert message in str(info.value)


SIGMA = gaussian_sigma(2.0, 1e-5, 0.2)
DP_RECORDS_THAT_DO_NOT_ADD_UP = {
    # 2.5x less noise than epsilon 2 needs: the real epsilon is ~7, the report would say 2
    "sigma too small": (dict(sigma=SIGMA / 2.5), f"sigma {SIGMA / 2.5:.6g} does not add up: epsilon 2, delta "
                                                 f"1e-05 and sensitivity 0.2 need sigma {SIGMA:.6g}"),
    "epsilon understated": (dict(epsilon=0.5), "does not add up: epsilon 0.5"),
    "sigma too large": (dict(sigma=SIGMA * 1.01), "does not add up"),
    "sensitivity understated": (dict(sensitivity=0.02), "sensitivity 0.02 does not add up: clip norm 1 over 10 "
                                                        "images per class gives 2C/n = 0.2"),
    "clip norm hidden": (dict(clip_norm=10.0), "sensitivity 0.2 does not add up: clip norm 10"),
    "n below the server's minimum": (dict(min_images=4, sensitivity=0.5, sigma=gaussian_sigma(2.0, 1e-5, 0.5)),
                                     "calibrated to 4 images per class, below the server's min-images-per-class 5"),
    "another mechanism": (dict(mechanism="laplace"), "mechanism 'laplace' under 'replace-one' neighbours is not"),
    "add-remove neighbours": (dict(neighbouring="add-remove"), "under 'add-remove' neighbours is not one"),
    "delta 1": (dict(delta=1.0), "dp-delta must lie strictly between 0 and 1"),
}


@pytest.mark.parametrize("case", sorted(DP_RECORDS_THAT_DO_NOT_ADD_UP))
def test_a_dp_record_that_does_not_add_up_is_rejected_with_the_reason(case: str) -> None:
    changes, message = DP_RECORDS_THAT_DO_NOT_ADD_UP[case]
    expect = Expectation(**{**POOLED.__dict__, "min_images_per_class": 5})
    content = over_the_wire(upload_content(make_upload(dp=dp_record(**changes))))
    with pytest.raises(PayloadError, match="^DP record: ") as info:
        parse_upload(content, expect)
    assert message in str(info.value)


def test_a_dp_record_is_checked_against_the_servers_minimum_from_its_instruction() -> None:
    instruction = OscarConfig(class_names=tuple("abcdefghij"), min_images_per_class=10).train_instruction()
    expect = Expectation.of(instruction, feature_dim=D)
    assert parse_upload(upload_content(make_upload(dp=dp_record())), expect).dp == dp_record()  # n_pub 10: enough
    nine = dp_record(min_images=9, sensitivity=mean_sensitivity(clip_norm=1.0, min_images=9),
                     sigma=gaussian_sigma(2.0, 1e-5, 2 / 9))
    with pytest.raises(PayloadError, match="calibrated to 9 images per class, below the server's "
                                           "min-images-per-class 10"):
        parse_upload(upload_content(make_upload(dp=nine)), expect)


def test_an_object_array_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    """An upload whose means are a pickled object array: refused, and the pickle's code never runs."""

    class Tripwire:
        def __reduce__(self):  # unpickling this calls Path.touch: a file appears if anyone unpickles it
            return ((tmp_path / "unpickled").touch, ())

    buffer = io.BytesIO()
    np.save(buffer, np.array([Tripwire()] * K, dtype=object), allow_pickle=True)
    np.load(io.BytesIO(buffer.getvalue()), allow_pickle=True)  # the tripwire works: loading it with pickle runs it
    assert (tmp_path / "unpickled").exists()
    (tmp_path / "unpickled").unlink()

    content = upload_content(make_upload())
    content.array_records[UPLOAD_ARRAYS_KEY]["means"] = Array(dtype="object", shape=(K,), stype="numpy.ndarray",
                                                              data=buffer.getvalue())
    with pytest.raises(PayloadError, match="array 'means' could not be decoded: Object arrays cannot be loaded"):
        parse_upload(over_the_wire(content), POOLED)
    assert not (tmp_path / "unpickled").exists()


def test_the_size_limit_reads_declared_shapes_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repetitive array is small on the wire (Flower deduplicates chunks) but large decoded: the limit
    must hold on the declared size, and nothing may be decoded before the check."""
    ones = make_upload(class_ids=np.arange(16, dtype=np.int64), means=np.ones((16, 4096, 256), dtype=np.float32))
    content = over_the_wire(upload_content(ones))  # 64 MiB of ones: Flower's identical 5 MiB chunks travel once
    assert wire_size(content) < declared_size(content.array_records[UPLOAD_ARRAYS_KEY]["means"]) / 3
    decoded = []
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(self) or np.zeros(1))
    with pytest.raises(PayloadError, match=r"declares 6710\d+ bytes .* over the limit"):
        parse_upload(content, POOLED)
    assert decoded == []


def test_default_limit_grows_with_the_classes() -> None:
    """345 DomainNet classes under `tokens` (77 x 768 float32 each, 81.6 MB) pass the default limit."""
    cfg = OscarConfig(scheme="tokens", class_names=tuple(f"c{i}" for i in range(345)))
    expect = Expectation.of(cfg.train_instruction(), feature_dim=768, max_bytes=cfg.max_payload_bytes)
    assert expect.byte_limit == upload_size_limit("tokens", 345, 768) > 345 * 77 * 768 * 4
    means = np.ones((345, 77, 768), dtype=np.float32)
    means[:, 0, 0] = np.arange(345)  # rows differ
    upload = make_upload(class_ids=np.arange(345, dtype=np.int64), means=means, scheme="tokens",
                         encoder_id=cfg.diffusion_model)
    assert parse_upload(upload_content(upload), expect).feature_shape == [345, 77, 768]
    with pytest.raises(PayloadError, match="over the limit"):
        parse_upload(upload_content(upload), Expectation(**{**expect.__dict__, "max_bytes": 64 * 2**20}))


def test_client_names_are_made_filesystem_safe() -> None:
    got = parse_upload(_with_meta(client_name="../../etc/passwd"), POOLED)
    assert "/" not in got.client_name and not got.client_name.startswith(".")


def test_instructions_round_trip_and_refuse_another_release() -> None:
    instruction = OscarConfig(class_names=("a", "b"), share_counts=True, dp_max_epsilon=4).train_instruction()
    record = over_the_wire(RecordDict({"i": instruction.to_record()})).config_records["i"]
    assert TrainInstruction.from_record(record) == instruction
    record["format-version"] = 1
    with pytest.raises(PayloadError, match="same release"):
        TrainInstruction.from_record(record)
    evaluate = EvaluateInstruction(class_names=("a", "b"), seed=3, image_size=64, preprocessing={"resize": 73})
    assert EvaluateInstruction.from_record(evaluate.to_record()) == evaluate


def test_replies_round_trip() -> None:
    evaluation = Evaluation(client_name="sketch", accuracy=0.5, num_examples=10, per_class={0: 1.0, 3: 0.25},
                            unreadable_images=1)
    assert Evaluation.from_content(over_the_wire(evaluation.to_record()), num_classes=4) == evaluation
    with pytest.raises(PayloadError, match="out of range"):
        Evaluation.from_content(evaluation.to_record(), num_classes=2)
    assert Identity.from_content(Identity("quickdraw").to_record()).client_name == "quickdraw"
    failure = ClientFailure(client_name="x", reason="Traceback (most recent call last):\n  File \"a.py\", line 1\n"
                            "\x1b[31mValueError: no class folder matches\x1b[0m", stage="upload")
    got = ClientFailure.from_content(over_the_wire(failure.to_record()))
    assert got.reason == "ValueError: no class folder matches" and got.client_name == "x"


def test_one_line_keeps_the_exception_of_a_traceback() -> None:
    ray = ("\x1b[36mray::ClientAppActor\x1b[39m\nTraceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
           "    raise DataDirError(msg)\n    ^^^^^^^^^^^^^^^^^^^^^\noscar.DataDirError: no folder matches\n")
    assert one_line(ray) == "oscar.DataDirError: no folder matches"
    assert one_line("a\nb") == "a b" and len(one_line("x" * 1000)) == 300


def test_model_record_round_trip() -> None:
    blob = bytes(range(256)) * 3
    content = over_the_wire(RecordDict({wire.MODEL_KEY: model_record(blob)}))
    assert model_blob(content) == blob
    with pytest.raises(PayloadError, match="has no"):
        model_blob(RecordDict())


def test_only_the_wire_module_spells_message_keys() -> None:
    """Every record key and message type lives in oscar_common/wire.py; other modules import them."""
    keys = [value for name, value in vars(wire).items() if name.endswith(("_KEY", "_MESSAGE_TYPE")) and
            isinstance(value, str) and "." in value]  # "train" alone is Flower's, and a common word
    assert len(keys) >= 9
    offenders = []
    for path in sorted(PROJECT.glob("oscar_*/**/*.py")):
        if path.name == "wire.py":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(PROJECT)}: {key}" for key in keys
                      if re.search(rf"[\"']{re.escape(key)}[\"']", text)]
    assert offenders == []
