"""k prototypes per class: the plain mean at k = 1, recovered modes, minimum sizes, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from oscar_client.prototypes import class_prototypes


def blobs(rng: np.random.Generator, sizes: list[int], centres: np.ndarray, spread: float) -> list[np.ndarray]:
    return [centre + spread * rng.normal(size=(size, centres.shape[1])) for size, centre in zip(sizes, centres)]


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_one_prototype_is_exactly_the_plain_mean():
    x = unit(np.random.default_rng(0).normal(size=(37, 512))).astype(np.float32)
    plain = x.mean(axis=0, dtype=np.float64).astype(np.float32)  # oscar_client.encoder.EncodedClient.means
    prototypes, sizes = class_prototypes(x, k=1, min_size=3, seed=0)
    np.testing.assert_array_equal(prototypes, plain[None])
    np.testing.assert_array_equal(sizes, [37])
    # Too few images for two prototypes of min_size: the plain mean again, whatever k asks.
    prototypes, sizes = class_prototypes(x, k=5, min_size=19, seed=0)
    np.testing.assert_array_equal(prototypes, plain[None])


def test_well_separated_modes_are_recovered_largest_first():
    rng = np.random.default_rng(1)
    centres = 3 * np.eye(3, 64)
    groups = blobs(rng, [20, 40, 30], centres, spread=0.05)
    prototypes, sizes = class_prototypes(np.concatenate(groups), k=3, min_size=5, seed=0)
    np.testing.assert_array_equal(sizes, [40, 30, 20])
    expected = np.stack([groups[1].mean(axis=0), groups[2].mean(axis=0), groups[0].mean(axis=0)])
    np.testing.assert_allclose(prototypes, expected, atol=1e-5)


def test_tokens_embeddings_are_clustered_flat_and_averaged_whole():
    rng = np.random.default_rng(2)
    groups = blobs(rng, [12, 9], np.stack([np.zeros(77 * 4), np.ones(77 * 4)]), spread=0.05)
    x = np.concatenate(groups).reshape(-1, 77, 4)
    prototypes, sizes = class_prototypes(x, k=2, min_size=3, seed=0)
    assert prototypes.shape == (2, 77, 4)
    np.testing.assert_array_equal(sizes, [12, 9])
    np.testing.assert_allclose(prototypes[1], groups[1].mean(axis=0).reshape(77, 4), atol=1e-5)


def test_a_cluster_below_the_minimum_joins_its_nearest_neighbour():
    rng = np.random.default_rng(3)
    far_a, far_b, near_a = 3 * np.eye(3, 16)[0], 3 * np.eye(3, 16)[1], 3 * np.eye(3, 16)[0] + 1.0 * np.eye(3, 16)[2]
    a, b, small = blobs(rng, [30, 25, 3], np.stack([far_a, far_b, near_a]), spread=0.02)
    prototypes, sizes = class_prototypes(np.concatenate([a, b, small]), k=3, min_size=5, seed=0)
    np.testing.assert_array_equal(sizes, [33, 25])
    np.testing.assert_allclose(prototypes[0], np.concatenate([a, small]).mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(prototypes[1], b.mean(axis=0), atol=1e-5)


def test_fewer_images_than_k_times_min_size_give_fewer_prototypes():
    x = unit(np.random.default_rng(4).normal(size=(12, 32)))
    prototypes, sizes = class_prototypes(x, k=5, min_size=5, seed=0)
    assert 1 <= len(prototypes) <= 2 and sizes.sum() == 12 and sizes.min() >= 5


def test_same_seed_same_prototypes_and_input_order_does_not_matter():
    # Overlapping modes: where k-means lands depends on its initialisation, so this checks real determinism.
    x = unit(np.random.default_rng(5).normal(size=(80, 24))).astype(np.float32)
    prototypes, sizes = class_prototypes(x, k=4, min_size=5, seed=11)
    permuted = x[np.random.default_rng(6).permutation(len(x))]
    again, again_sizes = class_prototypes(permuted, k=4, min_size=5, seed=11)
    np.testing.assert_array_equal(prototypes, again)
    np.testing.assert_array_equal(sizes, again_sizes)
    assert len(prototypes) == 4 and sizes.sum() == 80 and list(sizes) == sorted(sizes, reverse=True)


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """How far the farthest prototype of either set is from the other set (order-free)."""
    distances = np.linalg.norm(a[:, None] - b[None], axis=-1)
    return float(max(distances.min(axis=0).max(), distances.min(axis=1).max()))


def test_one_changed_image_can_move_a_prototype_far_more_than_its_share():
    # Why DP and k > 1 do not mix (see privacy.py): three modes of unit vectors, k = 2. Which two modes share
    # a prototype depends on every image, so one replaced image can regroup ten others.
    rng = np.random.default_rng(7)
    angles = np.concatenate([rng.normal(0.0, 0.02, 10), rng.normal(np.pi / 2, 0.02, 10), rng.normal(np.pi, 0.02, 10)])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    before, _ = class_prototypes(x, k=2, min_size=5, seed=0)
    largest_shift = 0.0
    for j in range(len(x)):
        for angle in np.linspace(-np.pi, np.pi, 24, endpoint=False):
            neighbour = x.copy()
            neighbour[j] = [np.cos(angle), np.sin(angle)]
            after, _ = class_prototypes(neighbour, k=2, min_size=5, seed=0)
            largest_shift = max(largest_shift, hausdorff(after, before))
    one_images_share = 2 * 1.0 / 5  # 2C / min_size with C = 1
    assert largest_shift > 1.5 * one_images_share


def test_bad_input_is_rejected_with_the_reason():
    x = np.ones((4, 8))
    with pytest.raises(ValueError, match="cannot make a prototype of at least 5"):
        class_prototypes(x, k=2, min_size=5, seed=0)
    with pytest.raises(ValueError, match="prototypes-per-class must be an integer >= 1"):
        class_prototypes(x, k=0, min_size=1, seed=0)
    with pytest.raises(ValueError, match=r"must be \[N, D\]"):
        class_prototypes(np.ones(8), k=1, min_size=1, seed=0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        class_prototypes(np.full((4, 8), np.inf), k=1, min_size=1, seed=0)
