"""The server's run directory keeps accepted uploads as the wire carried them, readable back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from oscar_common.config import OscarConfig
from oscar_common.wire import PayloadError, SharedCounts, Upload
from oscar_server.run_dir import RunDirectory


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
