"""Per-class running sums of embeddings: what a client averages and uploads, one batch at a time.

Sums are float64 (a class can hold thousands of ``[77, 768]`` rows) and only they, the counts and
optionally the raw embeddings are kept. The means are formed from the sums by ``oscar_client.encoder``.
"""

from __future__ import annotations

import numpy as np


class ClassAccumulator:
    """Running per-class ``sum`` and ``count`` of embeddings ``[N, ...]`` with integer class labels."""

    def __init__(self, *, keep_embeddings: bool = False) -> None:
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
        for class_id in np.unique(labels).tolist():
            mask = labels == class_id
            rows = embeddings[mask].sum(axis=0, dtype=np.float64)
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

    def sums(self) -> np.ndarray:
        """float64 ``[K, ...]`` in :attr:`class_ids` order."""
        if not self._sums:
            raise RuntimeError("no embeddings were added: there are no sums")
        return np.stack([self._sums[c] for c in sorted(self._sums)])

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The raw embeddings added so far ``[N, ...]`` (float32) and their labels ``[N]`` (int64), in order."""
        if not self.keep_embeddings:
            raise RuntimeError("this ClassAccumulator was made with keep_embeddings=False")
        if not self._kept:
            return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return np.concatenate(self._kept), np.concatenate(self._kept_labels)
