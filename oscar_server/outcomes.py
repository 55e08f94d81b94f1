"""What became of each client in a run, and the run's totals, computed once for the log and the report.

:class:`ClientOutcome` is an accepted client (its upload and, once it answered the broadcast, its
:class:`~oscar_common.wire.Evaluation` as it sent it); :class:`Rejection` is a node whose upload was not
accepted. The strategy makes them, :mod:`oscar_server.report` turns them into report.json and report.md,
and :func:`tally` is the only place that adds them up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from oscar_common.accuracy import client_mean_accuracy, overall_accuracy
from oscar_common.upload_rules import Upload

if TYPE_CHECKING:  # a type only: the run directory stores rejections and stays free of Flower's modules
    from oscar_common.wire import Evaluation


@dataclass
class ClientOutcome:
    """One accepted client: what it uploaded and how the model did on its test split."""

    node_id: int
    upload: Upload
    upload_bytes: int
    download_bytes: int = 0
    evaluation: Evaluation | None = None
    evaluation_error: str | None = None  # why there is no evaluation (None: no reply yet)

    @property
    def name(self) -> str:
        return self.upload.client_name

    def not_evaluated(self, reason: str) -> None:
        self.evaluation, self.evaluation_error = None, reason


@dataclass(frozen=True)
class Rejection:
    """A node whose upload was not accepted, the round it failed in, and why."""

    node_id: int
    name: str | None  # the client name it claimed, if any
    reason: str
    round: str = "upload"  # the round it was rejected in: "upload" or "evaluation"

    @property
    def sender(self) -> str:
        """Who sent it: the name it claimed, else its node."""
        return self.name or f"node {self.node_id}"


@dataclass(frozen=True)
class RunTotals:
    """The run's aggregates. ``weighted_accuracy`` is correct predictions over test images of all evaluated
    clients (accuracies weighted by test images), the official code's "Overall"; ``mean_accuracy`` is the
    unweighted mean over clients. Both are None when no client evaluated."""

    clients: int  # accepted uploads
    evaluated: int
    rejected: int
    test_images: int
    mean_accuracy: float | None
    weighted_accuracy: float | None
    upload_bytes: int  # accepted uploads, as measured on the wire
    download_bytes: int  # the broadcast model, all recipients


def tally(clients: Iterable[ClientOutcome], rejections: Iterable[Rejection]) -> RunTotals:
    clients = list(clients)
    evaluations = [c.evaluation for c in clients if c.evaluation is not None]
    test_images = sum(e.num_examples for e in evaluations)
    return RunTotals(
        clients=len(clients),
        evaluated=len(evaluations),
        rejected=len(list(rejections)),
        test_images=test_images,
        mean_accuracy=client_mean_accuracy([e.accuracy for e in evaluations]),
        weighted_accuracy=overall_accuracy([(e.accuracy, e.num_examples) for e in evaluations]),
        upload_bytes=sum(c.upload_bytes for c in clients),
        download_bytes=sum(c.download_bytes for c in clients),
    )
