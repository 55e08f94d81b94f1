"""What one poll of Flower's message store costs with N nodes and M stored messages (docs/scale.md).

    python -m oscar_bench.federation.flower_sweep

Flower 1.42's simulation engine sweeps every virtual node every 0.1 s (``vce_api.add_messages_to_queue``), and
a SuperLink answers each real SuperNode's poll, with ``InMemoryLinkState.get_message_ins(node, limit=1)``,
which scans the whole message store with its checks. This times one sweep over N nodes of a real
``InMemoryLinkState`` holding M train messages for M of them, after a first sweep has delivered them (the
state of a round: delivered messages stay stored until the server pulls their replies). max-in-flight
keeps M at most its value; 0 (all at once) makes M = N.
"""

from __future__ import annotations

import argparse
import time
from typing import cast

from flwr.app import Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid


def sweep_seconds(nodes: int, messages: int) -> float:
    """Seconds of one sweep over ``nodes`` nodes with ``messages`` delivered messages in the store."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = cast(InMemoryLinkState, factory.state())
    run = Run.create_empty(run_id=1)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 7
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=1)
    node_ids = list(_register_nodes(nodes, factory))  # as the simulation engine registers its virtual nodes
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    grid.push_messages([Message(RecordDict(), dst_node_id=node, message_type="train") for node in node_ids[:messages]])
    for node in node_ids:  # the first sweep delivers them
        state.get_message_ins(node_id=node, limit=1)
    started = time.perf_counter()
    for node in node_ids:
        state.get_message_ins(node_id=node, limit=1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=["100x100", "300x300", "1000x1000", "100x16", "300x16",
                                                        "1000x16", "1000x64", "1000x256"],
                        help="NODESxMESSAGES")
    args = parser.parse_args()
    # a ServerApp's identity, which Message() reads (run 1, sent by the SuperLink's node id 1)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 7
    print("| nodes | stored messages | one sweep ms | per (node, message) us |")
    print("|---:|---:|---:|---:|")
    for case in args.cases:
        nodes, messages = (int(v) for v in case.split("x"))
        seconds = min(sweep_seconds(nodes, messages) for _ in range(3))
        print(f"| {nodes:,} | {messages:,} | {seconds * 1000:,.1f} | {seconds / (nodes * messages) * 1e6:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
