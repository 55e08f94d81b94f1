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

from oscar_common.config import parse_run_config, run_config_dict

log = logging.getLogger("oscar.fedavg")

# Record names in the messages. ARRAYS_KEY and CONFIG_KEY are handed to Flower's FedAvg.
ARRAYS_KEY = "arrays"  # the global (server -> client) or locally trained (client -> server) state dict
CONFIG_KEY = "config"  # server -> client: FedAvgConfig.client_config() plus FedAvg's "server-round"
METRICS_KEY = "metrics"  # client -> server: "num-examples" (FedAvg's weight) and the client's metrics
INFO_KEY = "info"  # client -> server: "client-name"


@dataclass(frozen=True)
class FedAvgConfig:
    class_names: tuple[str, ...] = ()
    num_rounds: int = 10
    local_epochs: int = 1
    lr: float = 0.001  # SGD momentum 0.9, as OSCAR's server-side training (oscar_common.classifier)
    batch_size: int = 32
    classifier_image_size: int = 224
    classifier_pretrained: bool = True  # the initial global model; clients never need ImageNet weights
    seed: int = 0  # initial model, splits (same as OSCAR's for the same seed), local shuffling
    min_clients: int = 2
    wait_for_clients_timeout: float = 300.0
    round_timeout: float = 3600.0  # per train or evaluate phase; late replies are dropped, not waited on
    run_dir: str = "runs"
    run_name: str = ""  # empty: "fedavg-<Flower run id>"

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError("class-names is empty: set the class list, e.g. "
                             "--run-config \"class-names='cat,dog,horse'\"")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class-names has duplicates: {list(self.class_names)}")
        for name in ("num_rounds", "local_epochs", "batch_size", "classifier_image_size", "min_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedAvgConfig":
        kwargs, unknown = parse_run_config(cls, run_config)
        if unknown:
            log.info("run config keys not used by FedAvg: %s", ", ".join(sorted(unknown)))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return run_config_dict(self)

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

