"""A SuperNode's --node-config: where its data is, and the simulation's partition mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from oscar_common.node_settings import NodeSettings


def test_deployment_settings(tmp_path: Path) -> None:
    node = NodeSettings.from_context({"data-dir": str(tmp_path / "clipart"), "test-fraction": 0.3}, {})
    assert node.name == "clipart"
    assert node.output_dir == tmp_path / "clipart" / ".oscar-output"  # hidden: never read as a class
    assert node.test_fraction == 0.3 and node.train_list is None


def test_missing_data_dir_key_says_how_to_set_it() -> None:
    with pytest.raises(ValueError, match="--node-config"):
        NodeSettings.from_context({}, {})


def test_simulation_partitions_map_to_sorted_visible_folders(tmp_path: Path) -> None:
    for name in ("b-client", "a-client", ".hidden"):
        (tmp_path / name).mkdir()
    run_config = {"simulation-data-dir": str(tmp_path)}
    names = [NodeSettings.from_context({"partition-id": i, "num-partitions": 2}, run_config).name for i in (0, 1)]
    assert names == ["a-client", "b-client"]
    # a client's default output dir lives inside its own folder, so it never adds a partition
    (NodeSettings.from_context({"partition-id": 0}, run_config).output_dir).mkdir()
    assert NodeSettings.from_context({"partition-id": 1}, run_config).name == "b-client"
    with pytest.raises(ValueError, match="holds only 2 client folders"):
        NodeSettings.from_context({"partition-id": 2}, run_config)


def test_bad_test_fraction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test-fraction"):
        NodeSettings.from_context({"data-dir": str(tmp_path), "test-fraction": 1.5}, {})
    with pytest.raises(ValueError, match="node config: test-fraction must be a number"):
        NodeSettings.from_context({"data-dir": str(tmp_path), "test-fraction": "a fifth"}, {})
