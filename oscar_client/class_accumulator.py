"""Per-class running sums of embeddings: what a client averages and uploads, one batch at a time.

Sums are float64 (a class can hold thousands of ``[77, 768]`` rows) and only they, the counts and
optionally the raw embeddings are kept. The seam for what is summed is ``transform``: it maps each batch
of embeddings before it enters the sums, e.g. per-embedding L2 clipping for differential privacy (noise
is then added to the means, after accumulation). Kept embeddings are the raw ones, untransformed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


class ClassAccumulator:
    """Running per-class ``sum`` and ``count`` of embeddings ``[N, ...]`` with integer class labels."""

    def __init__(self, *, transform: Transform | None = None, keep_embeddings: bool = False) -> None:
        self.transform = transform
        self.keep_embeddings = keep_embeddings
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, int] = {}
        self._kept: list[np.ndarray] = []
        self._kept_labels: list[np.ndarray] = []

    def add(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        """Add a batch: ``embeddings[i]`` belongs to class ``labels[i]``."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(embeddings):
            raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
        if self.keep_embeddings:
            self._kept.append(embeddings.copy())
            self._kept_labels.append(labels.copy())
        summed = embeddings if self.transform is None else np.asarray(self.transform(embeddings), dtype=np.float32)
        if summed.shape != embeddings.shape:
            raise ValueError(f"transform changed the batch shape from {embeddings.shape} to {summed.shape}")
        for class_id in np.unique(labels).tolist():
            mask = labels == class_id
            rows = summed[mask].sum(axis=0, dtype=np.float64)
            if class_id in self._sums:
                self._sums[class_id] += rows
                self._counts[class_id] += int(mask.sum())
            else:
                self._sums[class_id] = rows
                self._counts[class_id] = int(mask.sum())

    @property
    def class_ids(self) -> np.ndarray:
        """int64 ``[K]``, sorted: the classes seen so far."""
        return np.array(sorted(self._sums), dtype=np.int64)

    @property
    def counts(self) -> np.ndarray:
        """int64 ``[K]``, in :attr:`class_ids` order."""
        return np.array([self._counts[c] for c in sorted(self._sums)], dtype=np.int64)

    def sums(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        """float64 ``[K, ...]`` in :attr:`class_ids` order (``shape``: a row's shape, for K = 0)."""
        if not self._sums:
            return np.zeros((0, *shape), dtype=np.float64)
        return np.stack([self._sums[c] for c in sorted(self._sums)])

    def means(self, min_count: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(class_ids, counts, means)`` for the classes with at least ``min_count`` embeddings.

        Means are float32, computed from the float64 sums, and deliberately *not* renormalised: the paper
        uploads the plain average of unit vectors (its norm also says how consistent a class's captions were).
        """
        ids, counts = self.class_ids, self.counts
        keep = counts >= min_count
        sums = self.sums()[keep]
        means = (sums / counts[keep].reshape(-1, *([1] * (sums.ndim - 1)))).astype(np.float32)
        return ids[keep], counts[keep], means

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The raw embeddings added so far ``[N, ...]`` (float32) and their labels ``[N]`` (int64), in order."""
        if not self.keep_embeddings:
            raise RuntimeError("this ClassAccumulator was made with keep_embeddings=False")
        if not self._kept:
            return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return np.concatenate(self._kept), np.concatenate(self._kept_labels)


def class_means(
    embeddings: np.ndarray, labels: np.ndarray, min_count: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class means of ``embeddings`` (``[N, ...]``) for classes with at least ``min_count`` samples.

    Returns ``(class_ids, counts, means)`` sorted by class id; see :meth:`ClassAccumulator.means`.
    """
    accumulator = ClassAccumulator()
    accumulator.add(embeddings, labels)
    return accumulator.means(min_count)
