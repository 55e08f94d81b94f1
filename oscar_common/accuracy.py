"""The two accuracies reported over a federation's clients, defined once for the server's report and for
``oscar-compare`` (which reads the OSCAR, FedAvg and centralized reports alike)."""

from __future__ import annotations

from collections.abc import Sequence


def overall_accuracy(results: Sequence[tuple[float, int]]) -> float | None:
    """Correct predictions over test images of all clients, from (accuracy, test images) pairs: accuracies
    weighted by test images, the official code's "Overall" and the paper's Table I. None without images."""
    images = sum(count for _, count in results)
    return sum(accuracy * count for accuracy, count in results) / images if images else None


def client_mean_accuracy(accuracies: Sequence[float]) -> float | None:
    """The unweighted mean over clients (differs from :func:`overall_accuracy` when test sets differ)."""
    return sum(accuracies) / len(accuracies) if accuracies else None
