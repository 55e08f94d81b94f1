"""Where a client's data lives and where its outputs go: the SuperNode's ``--node-config``.

Deployment (one SuperNode per client machine)::

    flower-supernode ... --node-config "data-dir='/data/clipart' name='clipart' output-dir='/data/oscar-out'"

Keys: ``data-dir`` (required; ``<class_name>/*.jpg`` folders), ``name`` (default: the data dir's folder
name), ``output-dir`` (default: ``<data-dir>/.oscar-output``, hidden so it is never read as a class
and never shifts the simulation's client folders), ``test-fraction`` (0.2),
``train-list`` / ``test-list`` (optional split files, one relative image path per line), ``device``
(``auto``). In local simulation Flower only gives ``partition-id``: client k then reads the k-th
sub-folder (sorted) of the run config's ``simulation-data-dir``.

A node can instead read its share of a benchmark (``oscar_common.benchmarks``)::

    --node-config "benchmark='domainnet' benchmark-root='/data/domainnet' client='clipart'"

The run config's benchmark keys (``benchmark``, ``benchmark-root``, ``train-shots``, ...) are defaults for
every node; in local simulation they select the benchmark and client k is its k-th client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from oscar_common.benchmarks import benchmark_client_name, benchmark_config, load_benchmark_partition
from oscar_common.config_values import parse_number
from oscar_common.data import Sample, load_client_split, scan_image_folder


@dataclass(frozen=True)
class NodeSettings:
    data_dir: Path
    name: str
    output_dir: Path
    test_fraction: float = 0.2
    train_list: Path | None = None
    test_list: Path | None = None
    device: str = "auto"
    benchmark: Mapping[str, Any] | None = None  # benchmark keys, when this node reads a benchmark
    # A folder this client shares with the other clients of its benchmark root (every client of a local
    # simulation): the broadcast model is kept there once, hard-linked into each output dir.
    shared_dir: Path | None = None

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> "NodeSettings":
        benchmark = benchmark_config(node_config, run_config)
        if benchmark is not None:
            return cls._for_benchmark(node_config, benchmark)
        if "data-dir" in node_config:
            data_dir = Path(str(node_config["data-dir"])).expanduser()
        elif "partition-id" in node_config:
            data_dir = _simulation_partition(run_config, int(node_config["partition-id"]))
        else:
            raise ValueError(
                "this SuperNode has no 'data-dir': start it with "
                "--node-config \"data-dir='/path/to/images' name='my-domain'\""
            )
        name = str(node_config.get("name") or data_dir.name)
        output_dir = Path(str(node_config.get("output-dir") or data_dir / ".oscar-output"))
        test_fraction = parse_number(node_config.get("test-fraction", 0.2), float, "node config: test-fraction")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test-fraction must be in [0, 1), got {test_fraction}")
        return cls(
            data_dir=data_dir,
            name=name,
            output_dir=output_dir.expanduser(),
            test_fraction=test_fraction,
            train_list=_optional_path(node_config.get("train-list")),
            test_list=_optional_path(node_config.get("test-list")),
            device=str(node_config.get("device", "auto")),
        )

    @classmethod
    def _for_benchmark(cls, node_config: Mapping[str, Any], benchmark: Mapping[str, Any]) -> "NodeSettings":
        root = Path(str(benchmark.get("benchmark-root", ""))).expanduser()
        name = str(node_config.get("name") or benchmark_client_name(benchmark))
        # Several clients share one benchmark root (always in simulation): one output folder each.
        shared = root / ".oscar-output"
        output_dir = Path(str(node_config.get("output-dir") or shared / name)).expanduser()
        return cls(data_dir=root, name=name, output_dir=output_dir, device=str(node_config.get("device", "auto")),
                   benchmark=dict(benchmark), shared_dir=None if node_config.get("output-dir") else shared)


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
    root = Path(str(run_config.get("simulation-data-dir", "demo/data"))).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"simulation-data-dir {str(root)!r} does not exist: run `make demo` once (it writes demo/data), or pass "
            "--run-config \"simulation-data-dir='/abs/path'\" with one sub-folder per client"
        )
    clients = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if partition_id >= len(clients):
        raise ValueError(f"partition {partition_id} has no data: {root} holds only {len(clients)} client folders")
    return clients[partition_id]
