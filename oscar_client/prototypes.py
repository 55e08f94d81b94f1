"""k prototypes per class: seeded k-means over one class's caption embeddings (FedDISC uses K = 5).

A single mean blurs a class whose captions fall into several modes ("a dog on grass", "a dog in a car"):
up to k cluster means keep the modes apart, and the server synthesizes from each.

* Geometry. Each sample is clustered as one flattened vector: a pooled ``[D]`` embedding as is, a tokens
  ``[77, H]`` embedding as ``77 * H`` numbers. That is the same L2 geometry the server's prompt embeddings
  live in, and it needs no EOS positions (which the ``[77, H]`` array alone does not carry; SD's padding
  states depend on the caption too). Each prototype is the mean of its members' full arrays.
* Algorithm. k-means++ initialisation, then Lloyd iterations until the assignment stops changing (or
  ``MAX_ITERATIONS``), numpy only. k is first lowered to ``N // min_size``; clusters that still end smaller
  than ``min_size`` are merged, smallest first, into the cluster with the nearest centre, so every
  prototype averages at least ``min_size`` images (the per-class minimum applies per prototype).
* Determinism. Rows are put in a canonical order (by a hash of their bytes) before the seeded
  initialisation, so the result depends on the set of rows and the seed, not on the input order; the
  prototypes come back sorted by cluster size (largest first), then lexicographically.
* k = 1 (or N < 2 * min_size) returns the plain mean, computed exactly as the per-class mean is.

Not differentially private: the clustering depends on all of a class's images, so one changed image can
move others between clusters and shift a prototype by much more than one image's share. See privacy.py.
"""

from __future__ import annotations

import hashlib

import numpy as np

MAX_ITERATIONS = 100


def class_prototypes(embeddings: np.ndarray, *, k: int, min_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` prototypes of one class's ``[N, ...]`` embeddings, each the mean of >= ``min_size`` rows.

    Returns ``(prototypes, sizes)``: float32 ``[k', ...]`` with ``1 <= k' <= min(k, N // min_size)``, and
    int64 ``[k']`` member counts, in canonical order (largest cluster first, ties lexicographic).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    _check_arguments(embeddings, k, min_size)
    n = len(embeddings)
    k = min(k, n // min_size)
    if k == 1:
        plain_mean = embeddings.mean(axis=0, dtype=np.float64)  # the same expression as the per-class mean
        return plain_mean.astype(np.float32)[None], np.array([n], dtype=np.int64)

    rows = _canonical_order(embeddings.reshape(n, -1).astype(np.float64))
    rng = np.random.default_rng(seed)
    labels = _lloyd(rows, _kmeans_plus_plus(rows, k, rng))
    labels = _merge_small_clusters(rows, labels, min_size)
    clusters = [rows[labels == c] for c in np.unique(labels)]
    centres = [cluster.mean(axis=0) for cluster in clusters]
    order = sorted(range(len(clusters)), key=lambda c: (-len(clusters[c]), centres[c].tolist()))
    prototypes = np.stack([centres[c] for c in order]).reshape(len(order), *embeddings.shape[1:])
    sizes = np.array([len(clusters[c]) for c in order], dtype=np.int64)
    return prototypes.astype(np.float32), sizes


def _canonical_order(rows: np.ndarray) -> np.ndarray:
    """The same rows sorted by a hash of their bytes: equal sets of rows give equal arrays."""
    keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
    return rows[sorted(range(len(rows)), key=keys.__getitem__)]


def _squared_distances(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``[N, k]`` squared L2 distances, clamped at 0 against rounding."""
    cross = rows @ centres.T
    distances = (rows**2).sum(axis=1)[:, None] - 2 * cross + (centres**2).sum(axis=1)[None, :]
    return np.maximum(distances, 0.0)


def _kmeans_plus_plus(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability ~ D(x)^2."""
    centres = [rows[rng.integers(len(rows))]]
    for _ in range(1, k):
        closest = _squared_distances(rows, np.stack(centres)).min(axis=1)
        if closest.sum() == 0:  # fewer distinct rows than k: no new centre can be found
            break
        centres.append(rows[rng.choice(len(rows), p=closest / closest.sum())])
    return np.stack(centres)


def _lloyd(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Lloyd iterations from ``centres``; returns each row's cluster label (empty clusters vanish)."""
    labels = _squared_distances(rows, centres).argmin(axis=1)
    for _ in range(MAX_ITERATIONS):
        centres = np.stack([rows[labels == c].mean(axis=0) for c in np.unique(labels)])
        new_labels = _squared_distances(rows, centres).argmin(axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def _merge_small_clusters(rows: np.ndarray, labels: np.ndarray, min_size: int) -> np.ndarray:
    """Merge clusters below ``min_size`` (smallest first) into the cluster with the nearest centre."""
    labels = labels.copy()
    while True:
        ids, sizes = np.unique(labels, return_counts=True)
        if len(ids) == 1 or sizes.min() >= min_size:
            return labels
        smallest = ids[sizes.argmin()]  # ties: lowest label, deterministic
        others = ids[ids != smallest]
        centres = np.stack([rows[labels == c].mean(axis=0) for c in others])
        own_centre = rows[labels == smallest].mean(axis=0, keepdims=True)
        labels[labels == smallest] = others[_squared_distances(own_centre, centres).argmin()]


def _check_arguments(embeddings: np.ndarray, k: int, min_size: int) -> None:
    if embeddings.ndim < 2:
        raise ValueError(f"embeddings must be [N, D] or [N, 77, H], got shape {embeddings.shape}")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings contain NaN or infinity: check the encoder's output")
    if int(k) != k or k < 1:
        raise ValueError(f"prototypes-per-class must be an integer >= 1, got {k!r}")
    if int(min_size) != min_size or min_size < 1:
        raise ValueError(f"the minimum images per prototype must be an integer >= 1, got {min_size!r}")
    if len(embeddings) < min_size:
        raise ValueError(f"{len(embeddings)} embeddings cannot make a prototype of at least {min_size}: "
                         "drop this class before computing prototypes")
