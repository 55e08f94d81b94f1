"""Every node-config key (a SuperNode's ``--node-config``), declared once.

    flower-supernode ... --node-config "data-dir='/data/clipart' name='clipart' dp-epsilon=4"

:class:`NodeConfig` is what the client, the baselines and ``oscar-centralized`` read
(``oscar_common.node_settings``, ``oscar_client.policy``, ``oscar_common.data.datasets``). The benchmark keys
of :class:`BenchmarkKeys` are also run-config keys (``OscarConfig`` inherits them): there they are defaults
for every node, and a node's own value wins (:func:`node_values`). The key table of docs/configuration.md
is generated from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from oscar_common.settings import Rule, Validated, above, at_least, setting


@dataclass(frozen=True)
class BenchmarkKeys(Validated):
    """The keys that pick a benchmark and shape each client's share: node-config keys, and run-wide defaults."""

    benchmark: str = setting("", "a benchmark to read instead of a data dir: domainnet, nico-dg, nico-unique, "
                                 "openimage, domains or label-skew (docs/reproducing.md); empty: plain client folders")
    benchmark_root: str = setting("", "the benchmark's folder on the node")
    train_shots: int = setting(0, "training images kept per class, the first ones in listing order",
                               at_least(0, "0: every image"))
    test_shots: int = setting(0, "test images kept per class, the first ones in listing order",
                              at_least(0, "0: every image"))
    num_clients: int = setting(0, "label-skew: the number of clients; 0: the simulation's number of nodes",
                               at_least(0))
    alpha: float = setting(0.5, "label-skew: Dirichlet concentration of each class over the clients "
                                "(lower: more skewed)", above(0))
    split_dir: str = setting("", "where the official split files are; empty: the benchmark's own place")
    test_root: str = setting("", "folder benchmarks: a second tree of the same layout holding the test split; "
                                 "empty: a seeded split of the root (test-fraction)")


@dataclass(frozen=True)
class PrivacyKeys(Validated):
    """What a client is willing to share, and how; the server cannot override it (oscar_client.policy)."""

    label: ClassVar[str] = "node config: "

    min_images_per_class: int = setting(0, "classes with fewer training images stay home; raises the server's "
                                           "minimum, never lowers it", at_least(0, "0: the server's"))
    share_counts: bool = setting(True, "false refuses to send label counts even when the run asks for them")
    dp_epsilon: float = setting(0.0, "differential privacy on the means with this epsilon; with the run's "
                                     "dp-max-epsilon the client uses the smaller of the two", at_least(0, "0: off"))
    dp_delta: float = setting(1e-5, "the delta of (epsilon, delta)-DP", Rule("in (0, 1)", lambda v: 0 < v < 1))
    dp_clip_norm: float | None = setting(
        None, "each caption embedding (tokens: its departure from the empty prompt's) is clipped to this L2 norm; "
              "not set: 1.0 for pooled (unit vectors), while tokens with DP needs it chosen (docs/privacy.md)",
        Rule("a finite number > 0", lambda v: v > 0))
    dp_budget: float = setting(0.0, "refuse a release that would take this data dir's composed epsilon "
                                    "(<output-dir>/privacy/ledger.json) past this", at_least(0, "0: no limit"))
    caption_cache: bool = setting(True, "reuse the captions of unchanged images from <output-dir>/caption-cache")
    require_preview_approval: bool = setting(False, "refuse to upload until oscar-preview has shown this very "
                                                    "upload (docs/privacy.md)")
    loader_workers: int = setting(-1, "DataLoader workers decoding images while the captioner runs; -1: from the "
                                      "device and core count")


@dataclass(frozen=True)
class NodeConfig(BenchmarkKeys, PrivacyKeys):
    """Every key a node reads from its node config."""

    label: ClassVar[str] = "node config: "

    data_dir: str = setting("", "the client's image folders, <class_name>/*.jpg (required unless benchmark is "
                                "set or in local simulation)")
    name: str = setting("", "the client's name in the report and in file names; empty: the data dir's folder "
                            "name (benchmark: the client's)")
    output_dir: str = setting("", "the client's own files (final weights, caption cache, upload summary, preview); "
                                  "empty: <data-dir>/.oscar-output (benchmark: <benchmark-root>/.oscar-output/<name>)")
    test_fraction: float = setting(0.2, "share of each class held out for the evaluation (without split files or "
                                        "test-root)", Rule("in [0, 1)", lambda v: 0 <= v < 1))
    train_list: str = setting("", "split file of the training images, one path relative to data-dir per line; "
                                  "empty: the seeded split (test-fraction)")
    test_list: str = setting("", "split file of the test images, as train-list")
    device: str = setting("auto", "auto (CUDA if present), cpu, cuda:1, ...")
    client: str = setting("", "this node's client of the benchmark, by name")
    client_index: int | None = setting(None, "this node's client of the benchmark, by position; not set: "
                                             "partition-id", at_least(0))
    partition_id: int | None = setting(None, "set by Flower's local simulation: this node's index (client k reads "
                                             "the k-th sub-folder of simulation-data-dir, or the benchmark's k-th "
                                             "client)", at_least(0))
    num_partitions: int | None = setting(None, "set by Flower's local simulation: the number of nodes")

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> "NodeConfig":
        return cls.from_values(node_values(node_config, run_config))


# The run-config keys that are defaults for every node's own.
RUN_WIDE_KEYS = tuple(f.name.replace("_", "-") for f in fields(BenchmarkKeys))


def node_values(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config over the run config's :data:`RUN_WIDE_KEYS` (empty strings there are unset).

    A node started with its own ``data-dir`` and no ``benchmark`` keeps its folder: no run-wide keys.
    """
    if node_config.get("data-dir") and not node_config.get("benchmark"):
        return dict(node_config)
    merged = {k: run_config[k] for k in RUN_WIDE_KEYS if run_config.get(k) not in (None, "")}
    merged.update(node_config)
    return merged
