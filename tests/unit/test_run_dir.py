"""The server's run directory keeps accepted uploads as the wire carried them, readable back exactly, under
the wire's own rules, without loading Flower."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save

from oscar_common.config import OscarConfig
from oscar_common.dp_calibration import MECHANISM, NEIGHBOURING, gaussian_sigma
from oscar_common.upload_rules import DpRecord, Expectation, PayloadError, SharedCounts, Upload
from oscar_common.wire import parse_upload, upload_content
from oscar_server.outcomes import Rejection
from oscar_server.run_dir import RunDirectory

PROJECT = Path(__file__).resolve().parents[2]


def _upload(**changes) -> Upload:
    values = dict(class_ids=np.array([2, 5]), means=np.random.default_rng(0).random((2, 512), dtype=np.float32),
                  scheme="pooled", encoder_id="openai/clip-vit-base-patch32", client_name="sketch")
    return Upload(**{**values, **changes})


def test_upload_is_persisted_with_the_wire_keys_and_read_back(tmp_path: Path) -> None:
    run_dir = RunDirectory.for_run(OscarConfig(run_dir=str(tmp_path), run_name="r1"), run_id=7)
    upload = _upload(counts=np.array([3, 4]), shared=SharedCounts(7, 1, ["zebra"]))
    path = run_dir.save_payload(upload, node_id=42)
    assert path == tmp_path / "r1" / "payloads" / "sketch.safetensors"
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temp file
    with safe_open(str(path), framework="np") as handle:
        assert set(handle.keys()) == {"class_ids", "means", "counts"}
        meta = handle.metadata()
    assert json.loads(meta["client-name"]) == "sketch" and json.loads(meta["skipped-classes"]) == ["zebra"]
    loaded, node_id = run_dir.load_payload(path)
    assert node_id == 42
    np.testing.assert_array_equal(loaded.means, upload.means)
    np.testing.assert_array_equal(loaded.class_ids, upload.class_ids)
    assert (loaded.client_name, loaded.shared.num_images, loaded.counts.tolist()) == ("sketch", 7, [3, 4])


def test_a_tampered_payload_file_is_validated_again(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    path = run_dir.save_payload(_upload(means=np.full((2, 512), np.nan, dtype=np.float32)), node_id=1)
    with pytest.raises(PayloadError, match="NaN"):
        run_dir.load_payload(path)


HONEST_DP = DpRecord(mechanism=MECHANISM, neighbouring=NEIGHBOURING, epsilon=2.0, delta=1e-5,
                     sigma=gaussian_sigma(2.0, 1e-5, 0.2), sensitivity=0.2, clip_norm=1.0, min_images=10)
# Uploads that break a rule an upload must meet on its own (not one set by the server's instruction).
BROKEN_UPLOADS = {
    "all-zero row": dict(means=np.zeros((2, 512), np.float32)),
    "descending ids": dict(class_ids=np.array([5, 2])),
    "duplicate ids": dict(class_ids=np.array([2, 2])),
    "zero count": dict(counts=np.array([0, 4]), shared=SharedCounts(4, 0, [])),
    "dp sigma does not add up": dict(dp=dataclasses.replace(HONEST_DP, epsilon=0.5)),
}


@pytest.mark.parametrize("case", sorted(BROKEN_UPLOADS))
def test_a_stored_upload_is_refused_by_the_wires_rule_with_the_wires_words(tmp_path: Path, case: str) -> None:
    """The run directory reads its payloads back through the same rule functions as the wire."""
    broken = _upload(**BROKEN_UPLOADS[case])
    expect = Expectation(scheme="pooled", encoder_id=broken.encoder_id, num_classes=10, feature_dim=512)
    with pytest.raises(PayloadError) as on_the_wire:
        parse_upload(upload_content(broken), expect)
    run_dir = RunDirectory(tmp_path)
    path = run_dir.save_payload(broken, node_id=3)
    with pytest.raises(PayloadError) as stored:
        run_dir.load_payload(path)
    assert str(stored.value) == str(on_the_wire.value)


def test_a_file_that_is_no_payload_is_refused_by_name(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    stranger = tmp_path / "payloads" / "stranger.safetensors"
    stranger.parent.mkdir()
    stranger.write_bytes(save({"means": np.ones((1, 4), np.float32)}, metadata={"scheme": "\"pooled\""}))
    with pytest.raises(PayloadError, match="stranger.safetensors: no 'oscar.node-id'"):
        run_dir.load_payload(stranger)
    stranger.write_bytes(b"not safetensors at all")
    with pytest.raises(PayloadError, match="not a payload file this server wrote"):
        run_dir.load_payload(stranger)


def test_reading_a_run_directory_loads_no_flower_module() -> None:
    """The server stages only read a run directory: importing it (and its payload codec) must not import
    Flower (checked in a fresh interpreter, where nothing else imported it first)."""
    modules = ("oscar_server.run_dir", "oscar_server.payload_file", "oscar_common.upload_rules",
               "oscar_server.outcomes")
    probe = (f"import sys; import {', '.join(modules)}; "
             "print(sorted(name for name in sys.modules if name == 'flwr' or name.startswith('flwr.')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    # the probe can fail: the wire module does load Flower
    wire = subprocess.run([sys.executable, "-c", probe.replace("import oscar_server.run_dir", "import oscar_common.wire")],
                          cwd=PROJECT, capture_output=True, text=True, check=True)
    assert "'flwr'" in wire.stdout


def test_the_upload_round_keeps_its_rejections_typed(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    run_dir.save_payload(_upload(client_name="kept"), 4)
    rejections = [Rejection(node_id=8, name="evil", reason="invalid payload: means contain NaN"),
                  Rejection(node_id=9, name=None, reason="no upload reply, and none from any node for 5s")]
    run_dir.save_upload_round([(4, "kept", 100)], rejections)
    accepted, rejected = run_dir.load_upload_round()
    assert rejected == rejections and [(u.client_name, n, b) for u, n, b in accepted] == [("kept", 4, 100)]
    assert json.loads(run_dir.uploads_path.read_text())["rejected"][0] == {
        "node_id": 8, "name": "evil", "reason": "invalid payload: means contain NaN", "round": "upload"}


def test_uploads_are_read_in_client_name_order(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    for node, name in ((5, "zeta"), (9, "alpha"), (1, "mid")):
        run_dir.save_payload(_upload(client_name=name), node)
    run_dir.save_upload_round([(5, "zeta", 1), (9, "alpha", 1), (1, "mid", 1)], [])
    assert [u.client_name for u in run_dir.accepted_uploads()] == ["alpha", "mid", "zeta"]


def test_only_a_run_that_went_through_counts_as_finished(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    assert run_dir.finished_status() is None
    for status, finished in (("failed", None), ("partial", "partial"), ("completed", "completed")):
        run_dir.report_json.write_text(json.dumps({"status": status}))
        assert run_dir.finished_status() == finished


def test_default_run_name_uses_the_flower_run_id(tmp_path: Path) -> None:
    assert RunDirectory.for_run(OscarConfig(run_dir=str(tmp_path)), run_id=123).root == tmp_path / "run-123"
