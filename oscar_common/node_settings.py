"""Where a client's data lives and where its outputs go, from the SuperNode's ``--node-config``.

Deployment (one SuperNode per client machine)::

    flower-supernode ... --node-config "data-dir='/data/clipart' name='clipart' output-dir='/data/oscar-out'"

The keys are declared in :class:`oscar_common.node_config.NodeConfig` (docs/configuration.md lists them).
The default ``output-dir`` is ``<data-dir>/.oscar-output``, hidden so it is never read as a class and never
shifts the simulation's client folders. In local simulation Flower only gives ``partition-id``: client k
then reads the k-th sub-folder (sorted) of the run config's ``simulation-data-dir``.

A node can instead read its share of a benchmark (``oscar_common.data.datasets``)::

    --node-config "benchmark='domainnet' benchmark-root='/data/domainnet' client='clipart'"

The run config's benchmark keys (``benchmark``, ``benchmark-root``, ``train-shots``, ...) are defaults for
every node; in local simulation they select the benchmark and client k is its k-th client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from oscar_common.config import OscarConfig
from oscar_common.data.datasets import benchmark_client_name, load_benchmark_partition
from oscar_common.data.local import Sample, load_client_split, scan_image_folder
from oscar_common.node_config import NodeConfig, node_values


@dataclass(frozen=True)
class NodeSettings:
    data_dir: Path
    name: str
    output_dir: Path
    test_fraction: float = NodeConfig.test_fraction
    train_list: Path | None = None
    test_list: Path | None = None
    device: str = NodeConfig.device
    benchmark: Mapping[str, Any] | None = None  # node config over run-wide keys, when this node reads a benchmark
    # A folder this client shares with the other clients of its benchmark root (every client of a local
    # simulation): the broadcast model is kept there once, hard-linked into each output dir.
    shared_dir: Path | None = None

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> "NodeSettings":
        values = node_values(node_config, run_config)
        config = NodeConfig.from_values(values)
        if config.benchmark:
            return cls._for_benchmark(config, values)
        if config.data_dir:
            data_dir = Path(config.data_dir).expanduser()
        elif config.partition_id is not None:
            data_dir = _simulation_partition(run_config, config.partition_id)
        else:
            raise ValueError(
                "this SuperNode has no 'data-dir': start it with "
                "--node-config \"data-dir='/path/to/images' name='my-domain'\""
            )
        return cls(
            data_dir=data_dir,
            name=config.name or data_dir.name,
            output_dir=Path(config.output_dir or data_dir / ".oscar-output").expanduser(),
            test_fraction=config.test_fraction,
            train_list=_optional_path(config.train_list),
            test_list=_optional_path(config.test_list),
            device=config.device,
        )

    @classmethod
    def _for_benchmark(cls, config: NodeConfig, values: Mapping[str, Any]) -> "NodeSettings":
        root = Path(config.benchmark_root).expanduser()
        name = config.name or benchmark_client_name(values)
        # Several clients share one benchmark root (always in simulation): one output folder each.
        shared = root / ".oscar-output"
        output_dir = Path(config.output_dir or shared / name).expanduser()
        return cls(data_dir=root, name=name, output_dir=output_dir, device=config.device,
                   benchmark=dict(values), shared_dir=None if config.output_dir else shared)

    def load_split(self, class_names: Sequence[str], seed: int) -> tuple[list[Sample], list[Sample], list[str]]:
        """(train, test, local classes not in the run): the same for a seed wherever it is called, so
        OSCAR, the baselines and the final evaluation all see the same images."""
        if self.benchmark is not None:
            partition = load_benchmark_partition(self.benchmark, class_names, seed)
            return partition.train, partition.test, partition.skipped_classes
        unknown = scan_image_folder(self.data_dir, class_names).unknown_classes
        train, test = load_client_split(self.data_dir, class_names, test_fraction=self.test_fraction, seed=seed,
                                        train_list=self.train_list, test_list=self.test_list)
        return train, test, unknown


def _optional_path(value: Any) -> Path | None:
    return Path(str(value)).expanduser() if value else None


def _simulation_partition(run_config: Mapping[str, Any], partition_id: int) -> Path:
    root = Path(str(run_config.get("simulation-data-dir", OscarConfig.simulation_data_dir))).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"simulation-data-dir {str(root)!r} does not exist: run `make demo` once (it writes demo/data), or pass "
            "--run-config \"simulation-data-dir='/abs/path'\" with one sub-folder per client"
        )
    clients = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if partition_id >= len(clients):
        raise ValueError(f"partition {partition_id} has no data: {root} holds only {len(clients)} client folders")
    return clients[partition_id]
