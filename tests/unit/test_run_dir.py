"""The server's run directory keeps accepted uploads as safetensors, readable back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from oscar_common.config import OscarConfig
from oscar_common.wire import ClientPayload
from oscar_server.run_dir import RunDirectory


def test_payload_is_persisted_and_read_back(tmp_path: Path) -> None:
    run_dir = RunDirectory.for_run(OscarConfig(run_dir=str(tmp_path), run_name="r1"), run_id=7)
    payload = ClientPayload(class_ids=np.array([2, 5]), counts=np.array([3, 4]),
                            means=np.random.default_rng(0).random((2, 512), dtype=np.float32),
                            scheme="pooled", encoder_id="openai/clip-vit-base-patch32", client_name="sketch",
                            num_images=7, unreadable_images=1, skipped_classes=["zebra"])
    path = run_dir.save_payload(payload, node_id=42)
    assert path == tmp_path / "r1" / "payloads" / "sketch.safetensors"
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temp file
    loaded, node_id = run_dir.load_payload(path)
    assert node_id == 42
    np.testing.assert_array_equal(loaded.means, payload.means)
    np.testing.assert_array_equal(loaded.class_ids, payload.class_ids)
    assert (loaded.client_name, loaded.num_images, loaded.skipped_classes) == ("sketch", 7, ["zebra"])


def test_default_run_name_uses_the_flower_run_id(tmp_path: Path) -> None:
    assert RunDirectory.for_run(OscarConfig(run_dir=str(tmp_path)), run_id=123).root == tmp_path / "run-123"
