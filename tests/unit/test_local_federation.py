"""LocalFederation's process environment (no process is started here)."""

from __future__ import annotations

from pathlib import Path

from oscar_demo.federation import ClientSpec, LocalFederation, client_threads


def test_clients_share_the_cores_out() -> None:
    assert [client_threads(2, n) for n in (1, 2, 3, 100)] == [2, 1, 1, 1]
    assert client_threads(16, 3) == 5 and client_threads(1, 0) == 1


def test_supernodes_get_a_thread_count_unless_the_caller_chose_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    clients = [ClientSpec(f"c{i}", tmp_path) for i in range(4)]
    assert LocalFederation(tmp_path, clients).supernode_env() == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    chosen = LocalFederation(tmp_path, clients, env={"OMP_NUM_THREADS": "3"}).supernode_env()
    assert chosen["OMP_NUM_THREADS"] == "3"
