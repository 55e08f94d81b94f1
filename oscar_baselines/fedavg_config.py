"""The FedAvg baseline's configuration and the record names its server and clients share.

Built from Flower's run config (``[tool.flwr.app.config]`` of ``baselines/fedavg/pyproject.toml``,
overridden with ``flwr run ... --run-config``). Keys that mean the same thing as in OSCAR's run config
have the same names (``class-names``, ``seed``, ``min-clients``, ``lr``, ``batch-size``,
``classifier-image-size``, ``classifier-pretrained``, ``wait-for-clients-timeout``, ``run-dir``,
``run-name``), so one overrides file can drive both. Clients read nothing of it themselves: the
server sends what they need with every train/evaluate message (:meth:`FedAvgConfig.client_config`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from oscar_common.settings import Validated, at_least, parse_settings, setting, settings_dict

log = logging.getLogger("oscar.fedavg")

# Record names in the messages. ARRAYS_KEY and CONFIG_KEY are handed to Flower's FedAvg.
ARRAYS_KEY = "arrays"  # the global (server -> client) or locally trained (client -> server) state dict
CONFIG_KEY = "config"  # server -> client: FedAvgConfig.client_config() plus FedAvg's "server-round"
METRICS_KEY = "metrics"  # client -> server: "num-examples" (FedAvg's weight) and the client's metrics
INFO_KEY = "info"  # client -> server: "client-name"


@dataclass(frozen=True)
class FedAvgConfig(Validated):
    class_names: tuple[str, ...] = setting((), "comma-separated class list (required)")
    num_rounds: int = setting(10, "federated rounds", at_least(1))
    local_epochs: int = setting(1, "epochs each client trains per round", at_least(1))
    lr: float = setting(0.001, "local SGD learning rate (momentum 0.9, as OSCAR's server-side training)")
    batch_size: int = setting(32, "local training batch", at_least(1))
    classifier_image_size: int = setting(224, "classifier input size", at_least(1))
    classifier_pretrained: bool = setting(True, "the initial global model starts from ImageNet weights; clients "
                                                "never need them")
    seed: int = setting(0, "initial model, splits (the same as OSCAR's for the same seed), local shuffling")
    min_clients: int = setting(2, "nodes to wait for before the first round", at_least(1))
    wait_for_clients_timeout: float = setting(300.0, "seconds to wait for min-clients nodes to connect")
    round_timeout: float = setting(3600.0, "seconds to wait for the replies of one train or evaluate phase; later "
                                           "replies are dropped")
    run_dir: str = setting("runs", "where run directories go")
    run_name: str = setting("", "this run's folder name in run-dir; empty: fedavg-<Flower run id>")

    def config_problems(self) -> list[str]:
        problems = super().config_problems()
        if not self.class_names:
            problems.append("class-names is empty: set the class list, e.g. "
                            "--run-config \"class-names='cat,dog,horse'\"")
        if len(set(self.class_names)) != len(self.class_names):
            problems.append(f"class-names has duplicates: {list(self.class_names)}")
        return problems

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedAvgConfig":
        kwargs, unknown = parse_settings(cls, run_config)
        if unknown:
            log.info("run config keys not used by FedAvg: %s", ", ".join(sorted(unknown)))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return settings_dict(self)

    def client_config(self) -> dict[str, Any]:
        """What a client needs for local training and evaluation (sent in every message)."""
        return {
            "class-names": list(self.class_names),
            "seed": self.seed,
            "local-epochs": self.local_epochs,
            "lr": self.lr,
            "batch-size": self.batch_size,
            "classifier-image-size": self.classifier_image_size,
        }

