"""Real benchmarks as OSCAR clients: the paper's DomainNet, NICO++ and OpenImage setups, any
multi-domain folder tree, and Dirichlet label-skew partitions of a single-domain tree.

A SuperNode names its share of a benchmark in its node config instead of a ``data-dir``::

    benchmark='domainnet' benchmark-root='/data/domainnet' client='clipart' train-shots=30

``benchmark``: ``domainnet``, ``nico-dg``, ``nico-unique`` (official split lists: see ``domainnet`` and
``nico``), ``openimage``, ``domains``, ``label-skew`` (folder trees: see ``folders``). The client is
``client='<name>'`` or ``client-index=<k>`` (simulation: the partition id). The keys are declared in
``oscar_common.node_config``; the run config may carry the run-wide ones for every client (the node
config wins): see :func:`benchmark_config`. Nothing is downloaded: the data must already be on the node.

The server's ``class-names`` come from :func:`benchmark_class_names` (CLI: ``oscar-class-names``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from oscar_common.data.datasets.common import (
    Benchmark,
    BenchmarkError,
    BenchmarkOptions,
    ClientPartition,
    logger,
    select_classes,
    take_shots,
)
from oscar_common.data.datasets.domainnet import DomainNet
from oscar_common.data.datasets.folders import DomainFolders, LabelSkew, OpenImage
from oscar_common.data.datasets.nico import NicoDG, NicoUnique
from oscar_common.node_config import node_values

__all__ = [
    "BENCHMARKS", "BenchmarkError", "ClientPartition", "benchmark_class_names", "benchmark_client_name",
    "benchmark_clients", "benchmark_config", "load_benchmark_partition", "open_benchmark",
]

BENCHMARKS: dict[str, type[Benchmark]] = {
    "domainnet": DomainNet,
    "nico-dg": NicoDG,
    "nico-unique": NicoUnique,
    "openimage": OpenImage,
    "domains": DomainFolders,
    "label-skew": LabelSkew,
}

def open_benchmark(options: BenchmarkOptions, seed: int = 0) -> Benchmark:
    if options.benchmark not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {options.benchmark!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[options.benchmark](options, seed)


def benchmark_config(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """This node's config over the run-wide benchmark keys (:func:`~oscar_common.node_config.node_values`),
    or None when it reads a plain ``data-dir``."""
    merged = node_values(node_config, run_config)
    return merged if merged.get("benchmark") else None


def benchmark_client_name(config: Mapping[str, Any]) -> str:
    """The name of the client that ``config`` (from :func:`benchmark_config`) selects."""
    return open_benchmark(BenchmarkOptions.from_config(config)).resolve_client()


def load_benchmark_partition(
    config: Mapping[str, Any], class_names: Sequence[str], seed: int = 0
) -> ClientPartition:
    """This client's (train, test) samples of the run's classes, deterministic for a given seed."""
    benchmark = open_benchmark(BenchmarkOptions.from_config(config), seed)
    options = benchmark.options
    client = benchmark.resolve_client()
    train, test = benchmark.client_samples(client)
    wanted = set(class_names)
    skipped = sorted({s.class_name for s in train + test} - wanted)
    if skipped:
        logger.info("%s %s: %d class(es) not in this run, skipped", options.benchmark, client, len(skipped))
    train = take_shots([s for s in train if s.class_name in wanted], options.train_shots)
    test = take_shots([s for s in test if s.class_name in wanted], options.test_shots)
    missing = [s.path for s in train + test if not s.path.is_file()]
    if missing:
        raise BenchmarkError(f"{options.benchmark} {client}: {len(missing)} listed image(s) not found, "
                             f"e.g. {[str(p) for p in missing[:3]]} (is benchmark-root {options.root} right?)")
    if not train:
        raise BenchmarkError(f"{options.benchmark} {client}: no training images of the run's classes under "
                             f"{options.root}")
    logger.info("%s %s: %d train / %d test images in %d classes", options.benchmark, client, len(train),
                len(test), len({s.class_name for s in train}))
    return ClientPartition(client, train, test, skipped)


def benchmark_class_names(benchmark: str, root: Any, subset: str = "", **options: Any) -> list[str]:
    """The run's ``class-names`` for a benchmark and class subset (see :func:`select_classes`)."""
    return select_classes(open_benchmark(_options(benchmark, root, options)), subset)


def benchmark_clients(benchmark: str, root: Any, **options: Any) -> list[str]:
    """The benchmark's client names, in ``client-index`` order."""
    return open_benchmark(_options(benchmark, root, options)).clients()


def _options(benchmark: str, root: Any, options: Mapping[str, Any]) -> BenchmarkOptions:
    keys = {k.replace("_", "-"): v for k, v in options.items() if v is not None}
    return BenchmarkOptions.from_config({"benchmark": benchmark, "benchmark-root": root, **keys})
