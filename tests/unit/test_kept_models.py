"""Clients keep the broadcast model; the clients of one benchmark root (a simulation's virtual clients) keep
one copy between them, hard-linked into each output dir, instead of one 45 MB file each."""

from __future__ import annotations

import os
from pathlib import Path

from oscar_client.client_app import SHARED_MODELS_DIR, WEIGHTS_FILE, keep_model
from oscar_common.files import write_shared_copy
from oscar_common.node_settings import NodeSettings


def _label_skew_client(root: Path, k: int, **node_config: str) -> NodeSettings:
    run_config = {"benchmark": "label-skew", "benchmark-root": str(root), "num-clients": 3}
    return NodeSettings.from_context({"partition-id": k, "num-partitions": 3, **node_config}, run_config)


def test_simulated_clients_keep_one_copy_of_the_same_model(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    clients = [_label_skew_client(tmp_path, k) for k in range(3)]
    paths = [keep_model(client, b"model one") for client in clients]
    assert paths == [tmp_path / ".oscar-output" / f"client-{k}" / WEIGHTS_FILE for k in range(3)]
    assert all(path.read_bytes() == b"model one" for path in paths)
    assert len({path.stat().st_ino for path in paths}) == 1 and paths[0].stat().st_nlink == 4  # + the store's
    store = tmp_path / ".oscar-output" / SHARED_MODELS_DIR
    assert len(list(store.iterdir())) == 1

    # the next run's model: the old one goes once no client links to it any more
    keep_model(clients[0], b"model two")
    assert paths[0].read_bytes() == b"model two" and paths[1].read_bytes() == b"model one"
    assert len(list(store.iterdir())) == 2
    for client in clients[1:]:
        keep_model(client, b"model two")
    assert [p.read_bytes() for p in store.iterdir()] == [b"model two"]
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_own_output_dirs_and_plain_clients_get_a_file_of_their_own(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    own = _label_skew_client(tmp_path, 0, **{"output-dir": str(tmp_path / "mine")})
    plain = NodeSettings.from_context({"data-dir": str(tmp_path / "cat")}, {})
    assert own.shared_dir is None and plain.shared_dir is None
    for node in (own, plain):
        assert keep_model(node, b"weights").stat().st_nlink == 1
    assert not (tmp_path / ".oscar-output").exists()


def test_a_damaged_store_entry_is_rewritten_and_never_linked(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_shared_copy(tmp_path / "a" / "w.safetensors", b"weights", store)
    (entry,) = store.iterdir()
    os.unlink(tmp_path / "a" / "w.safetensors")
    entry.write_bytes(b"damaged")  # same name (the content hash), other content
    write_shared_copy(tmp_path / "b" / "w.safetensors", b"weights", store)
    assert (tmp_path / "b" / "w.safetensors").read_bytes() == b"weights" == entry.read_bytes()


def test_a_client_that_finds_the_entry_published_meanwhile_links_to_it(tmp_path: Path, monkeypatch) -> None:
    """Two clients evaluating at once: the second one to publish keeps the first one's entry (one copy)."""
    store = tmp_path / "store"
    write_shared_copy(tmp_path / "a" / "w.safetensors", b"weights", store)
    (entry,) = store.iterdir()
    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: False if self == entry else real_is_file(self))  # too late
    write_shared_copy(tmp_path / "b" / "w.safetensors", b"weights", store)
    assert (tmp_path / "b" / "w.safetensors").stat().st_ino == (tmp_path / "a" / "w.safetensors").stat().st_ino
    assert list(store.iterdir()) == [entry]


def test_a_concurrent_clients_half_published_entry_is_left_alone(tmp_path: Path) -> None:
    """Client B's entry being written (a temporary file, one link) when client A cleans the store up."""
    store = tmp_path / "store"
    store.mkdir()
    in_flight = store / ".0123abcd.safetensors.5f5f.tmp"
    in_flight.write_bytes(b"weights")
    write_shared_copy(tmp_path / "a" / "w.safetensors", b"weights", store)
    assert in_flight.exists()
