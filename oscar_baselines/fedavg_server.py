"""The FedAvg baseline's Flower ServerApp: Flower's own ``FedAvg`` on the ResNet-18, measured.

:class:`MeasuredFedAvg` is ``flwr.serverapp.strategy.FedAvg`` (sampling, weighted averaging by
``num-examples``, metric aggregation untouched) with three additions:

* before each phase it waits for ``min-clients`` nodes with a timeout, so FedAvg's ``sample_nodes``
  (which waits forever for ``min_available_nodes``) is only called when it returns at once; the
  strategy's ``timeout`` (``round-timeout``) bounds every wait for replies;
* it measures every message as serialised on the wire (``oscar_common.wire.wire_size``): bytes
  downloaded (server -> client) and uploaded (client -> server), per client, over all rounds;
* it keeps every client's metrics of every round.

The report (``<run-dir>/<run-name>/report.json``, rewritten after every round) uses OSCAR's field
names where they mean the same (``clients[].name``, ``test_accuracy``, ``num_test``, ``upload_bytes``,
``download_bytes``, ``accuracy``, ``communication``) so ``oscar-compare`` reads both alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from oscar_baselines.fedavg_config import ARRAYS_KEY, CONFIG_KEY, INFO_KEY, METRICS_KEY, FedAvgConfig
from oscar_common.accuracy import client_mean_accuracy, overall_accuracy
from oscar_common.files import atomic_write_json
from oscar_common.logs import setup_logging
from oscar_common.training.classifier import ARCHITECTURE, build_classifier, save_classifier
from oscar_common.wire import wire_size

log = logging.getLogger("oscar.fedavg")
app = ServerApp()
POLL_SECONDS = 1.0


class NotEnoughClientsError(RuntimeError):
    """Fewer than ``min-clients`` nodes connected within ``wait-for-clients-timeout``."""


@dataclass
class ClientStats:
    node_id: int
    name: str = ""
    upload_bytes: int = 0
    download_bytes: int = 0
    num_train: int | None = None
    rounds_trained: int = 0


@dataclass
class RoundStats:
    round: int
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    train: dict[str, dict[str, Any]] = field(default_factory=dict)  # client name -> its metrics
    evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    aggregated_train: dict[str, Any] | None = None
    aggregated_evaluate: dict[str, Any] | None = None


class MeasuredFedAvg(FedAvg):
    def __init__(self, cfg: FedAvgConfig, report_path: Path) -> None:
        # Every connected node trains and evaluates in every round, as in the paper's baselines.
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=cfg.min_clients,
                         min_evaluate_nodes=cfg.min_clients, min_available_nodes=cfg.min_clients,
                         arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY)
        self.cfg = cfg
        self.report_path = report_path
        self.clients: dict[int, ClientStats] = {}
        self.rounds: list[RoundStats] = []
        self.started = time.monotonic()
        self.state_dict_bytes = _state_dict_bytes(len(cfg.class_names))

    # ------------------------------------------------------------------ FedAvg hooks, measured
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.rounds.append(RoundStats(server_round))
        self._wait_for_nodes(grid)
        return self._count_downloads(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._wait_for_nodes(grid)
        return self._count_downloads(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        current = self.rounds[-1]
        for reply, client in self._count_uploads(replies, current):
            metrics = reply.content.metric_records[METRICS_KEY]
            client.num_train = int(metrics["num-examples"])
            client.rounds_trained += 1
            current.train[client.name] = _plain(metrics)
        arrays, metrics = super().aggregate_train(server_round, replies)
        current.aggregated_train = None if metrics is None else _plain(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        current = self.rounds[-1]
        for reply, client in self._count_uploads(replies, current):
            current.evaluate[client.name] = _plain(reply.content.metric_records[METRICS_KEY])
        metrics = super().aggregate_evaluate(server_round, replies)
        current.aggregated_evaluate = None if metrics is None else _plain(metrics)
        current.seconds = time.monotonic() - current.started
        self.write_report("running")  # a look at the run between rounds; "completed" at the end
        return metrics

    # ------------------------------------------------------------------ report
    def report(self, status: str, error: str | None = None) -> dict[str, Any]:
        # A client's accuracy is that of the last evaluated global model: None if it missed that evaluation.
        final = next((r.evaluate for r in reversed(self.rounds) if r.evaluate), {})
        clients = [{
            "node_id": c.node_id, "name": c.name, "num_train": c.num_train, "rounds_trained": c.rounds_trained,
            "test_accuracy": final.get(c.name, {}).get("accuracy"),
            "num_test": final.get(c.name, {}).get("num-examples"),
            "upload_bytes": c.upload_bytes, "download_bytes": c.download_bytes,
        } for c in sorted(self.clients.values(), key=lambda c: c.name)]
        evaluated = [c for c in clients if c["test_accuracy"] is not None]
        num_classes = len(self.cfg.class_names)
        return {
            "method": "fedavg",
            "status": status,
            "error": error,
            "config": self.cfg.to_dict(),
            "model": {"architecture": ARCHITECTURE, "num_classes": num_classes,
                      "state_dict_bytes": self.state_dict_bytes},
            "clients": clients,
            "rounds": [{
                "round": r.round, "seconds": round(r.seconds, 2), "train": r.train, "evaluate": r.evaluate,
                "aggregated_train": r.aggregated_train, "aggregated_evaluate": r.aggregated_evaluate,
                "errors": r.errors,
            } for r in self.rounds],
            "accuracy": {
                "mean": client_mean_accuracy([c["test_accuracy"] for c in evaluated]),
                "weighted": overall_accuracy([(c["test_accuracy"], c["num_test"]) for c in evaluated]),
            },
            "communication": {
                "upload_bytes_total": sum(c["upload_bytes"] for c in clients),
                "download_bytes_total": sum(c["download_bytes"] for c in clients),
            },
            "timings_seconds": {"total": round(time.monotonic() - self.started, 2)},
        }

    def write_report(self, status: str, error: str | None = None) -> dict[str, Any]:
        report = self.report(status, error)
        atomic_write_json(self.report_path, report)
        return report

    # ------------------------------------------------------------------ helpers
    def _client(self, node_id: int) -> ClientStats:
        return self.clients.setdefault(node_id, ClientStats(node_id, name=f"node-{node_id}"))

    def _count_downloads(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if messages:
            size = wire_size(messages[0].content)  # FedAvg sends one RecordDict to every sampled node
            for message in messages:
                self._client(message.metadata.dst_node_id).download_bytes += size
        return messages

    def _count_uploads(self, replies: list[Message], current: RoundStats) -> list[tuple[Message, ClientStats]]:
        """Count every reply's wire size, note errors; return the replies with content and their clients."""
        ok = []
        for reply in replies:
            client = self._client(reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("round %d: node %s (%s) replied with an error: %s", current.round,
                            client.node_id, client.name, reply.error.reason)
                current.errors.append({"node_id": client.node_id, "client": client.name,
                                       "reason": reply.error.reason})
                continue
            client.upload_bytes += wire_size(reply.content)
            if INFO_KEY in reply.content.config_records:
                client.name = self._unique_name(str(reply.content.config_records[INFO_KEY]["client-name"]),
                                                client.node_id)
            ok.append((reply, client))
        return ok

    def _unique_name(self, name: str, node_id: int) -> str:
        taken = {c.name for c in self.clients.values() if c.node_id != node_id}
        return name if name not in taken else f"{name}-{node_id}"

    def _wait_for_nodes(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.cfg.wait_for_clients_timeout
        while len(nodes := list(grid.get_node_ids())) < self.cfg.min_clients:
            if time.monotonic() > deadline:
                raise NotEnoughClientsError(
                    f"only {len(nodes)} of min-clients={self.cfg.min_clients} nodes connected within "
                    f"{self.cfg.wait_for_clients_timeout:.0f}s (wait-for-clients-timeout)")
            log.info("waiting for clients: %d connected, %d required", len(nodes), self.cfg.min_clients)
            time.sleep(POLL_SECONDS)


def _plain(metrics: MetricRecord) -> dict[str, Any]:
    return {k: v for k, v in metrics.items()}


def _state_dict_bytes(num_classes: int) -> int:
    """Bytes of the ResNet-18 state dict (parameters and BatchNorm buffers): what one upload carries."""
    with torch.device("meta"):  # shapes and dtypes only
        model = build_classifier(num_classes)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = FedAvgConfig.from_run_config(context.run_config)
    run_root = Path(cfg.run_dir).expanduser().resolve() / (cfg.run_name or f"fedavg-{context.run_id}")
    run_root.mkdir(parents=True, exist_ok=True)
    strategy = MeasuredFedAvg(cfg, run_root / "report.json")
    try:
        # ImageNet weights, when asked for, are needed here only: clients receive the global model
        model = build_classifier(len(cfg.class_names), pretrained=cfg.classifier_pretrained, seed=cfg.seed)
        result = strategy.start(grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_rounds,
                                timeout=cfg.round_timeout, train_config=ConfigRecord(cfg.client_config()),
                                evaluate_config=ConfigRecord(cfg.client_config()))
        if not result.arrays:  # FedAvg keeps the previous model when a round has no valid reply
            raise RuntimeError("no round produced an aggregated model: every client failed to train")
        model.load_state_dict(result.arrays.to_torch_state_dict())
        save_classifier(model, run_root / "model.safetensors", {"method": "fedavg"}, class_names=cfg.class_names)
    except Exception as exc:
        strategy.write_report("failed", f"{type(exc).__name__}: {exc}")
        log.error("FedAvg run failed: %s (report: %s)", exc, strategy.report_path)
        raise
    report = strategy.write_report("completed")
    log.info("FedAvg run completed in %.1fs; mean test accuracy %s; report: %s",
             report["timings_seconds"]["total"], report["accuracy"]["mean"], strategy.report_path)
