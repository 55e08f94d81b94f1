"""The run's totals: the official "Overall" (correct over test images), the mean over clients, and counts."""

from __future__ import annotations

import numpy as np
import pytest

from oscar_common.upload_rules import Upload
from oscar_common.wire import Evaluation
from oscar_server.outcomes import ClientOutcome, Rejection, RunTotals, tally


def _outcome(name: str, accuracy: float | None = None, num_test: int = 0) -> ClientOutcome:
    upload = Upload(class_ids=np.array([0]), means=np.ones((1, 4), np.float32), scheme="pooled", encoder_id="e",
                    client_name=name)
    outcome = ClientOutcome(node_id=len(name), upload=upload, upload_bytes=100, download_bytes=1000)
    if accuracy is None:
        outcome.not_evaluated("no evaluation reply")
    else:
        outcome.evaluation = Evaluation(client_name=name, accuracy=accuracy, num_examples=num_test, per_class={})
    return outcome


def test_overall_weighs_clients_by_test_images_and_the_mean_does_not() -> None:
    """clipart has 3x sketch's test images: overall is (5 + 27) / 40, the mean (0.5 + 0.9) / 2."""
    clients = [_outcome("sketch", 0.5, 10), _outcome("clipart", 0.9, 30), _outcome("silent")]
    totals = tally(clients, [Rejection(node_id=9, name=None, reason="no upload reply")])
    assert totals == RunTotals(clients=3, evaluated=2, rejected=1, test_images=40,
                               mean_accuracy=pytest.approx(0.7), weighted_accuracy=pytest.approx(0.8),
                               upload_bytes=300, download_bytes=3000)


def test_without_an_evaluation_there_is_no_accuracy() -> None:
    totals = tally([_outcome("silent")], [])
    assert (totals.evaluated, totals.mean_accuracy, totals.weighted_accuracy) == (0, None, None)
    assert tally([], []).clients == 0


def test_a_rejection_names_its_sender_by_the_name_it_claimed_else_its_node() -> None:
    assert Rejection(node_id=4, name="evil", reason="x").sender == "evil"
    assert Rejection(node_id=4, name=None, reason="x").sender == "node 4"
