"""Differential privacy of the per-class means: calibration, clipping, sensitivity, noise, determinism."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from scipy.stats import norm

from oscar_client.privacy import (
    DpRecord,
    clip_to_norm,
    clipped_mean,
    gaussian_sigma,
    keyed_generator,
    mean_sensitivity,
    privatize_class_means,
)

PARAMETERS = dict(epsilon=1.0, delta=1e-5, clip_norm=1.0, min_images=10)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- calibration -----------------------------------------------------------------------------------

def test_analytic_sigma_matches_the_known_value_and_beats_the_classic_bound():
    # epsilon = 1, delta = 1e-5, Delta = 1: analytic Gaussian 3.7306; Dwork & Roth (2014) Thm A.1 gives 4.8448.
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) * 1.0 / 1.0
    assert classic == pytest.approx(4.8448, abs=1e-4)
    assert gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.7306, abs=1e-4)


@pytest.mark.parametrize("epsilon, delta, sensitivity", [(1.0, 1e-5, 1.0), (0.3, 1e-6, 0.2), (8.0, 1e-5, 0.02)])
def test_sigma_satisfies_balle_wang_theorem_8(epsilon, delta, sensitivity):
    # Independent of dp-accounting: the exact delta of the Gaussian mechanism (Balle & Wang 2018, Thm. 8).
    sigma = gaussian_sigma(epsilon, delta, sensitivity)
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    exact_delta = norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)
    assert exact_delta == pytest.approx(delta, rel=1e-6)


def test_the_privacy_loss_distribution_accountant_agrees():
    sigma = gaussian_sigma(2.0, 1e-5, 0.2)
    pld = privacy_loss_distribution.from_gaussian_mechanism(sigma, sensitivity=0.2)
    assert pld.get_epsilon_for_delta(1e-5) == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("sensitivity", [1.0, 0.02])
def test_sigma_and_epsilon_round_trip(epsilon, sensitivity):
    sigma = gaussian_sigma(epsilon, 1e-5, sensitivity)
    assert dp_accounting.get_epsilon_gaussian(sigma / sensitivity, 1e-5) == pytest.approx(epsilon, rel=1e-6)


def test_sigma_scales_with_sensitivity_and_falls_with_epsilon():
    assert gaussian_sigma(1.0, 1e-5, 0.2) == pytest.approx(0.2 * gaussian_sigma(1.0, 1e-5, 1.0), rel=1e-9)
    assert gaussian_sigma(4.0, 1e-5, 1.0) < gaussian_sigma(1.0, 1e-5, 1.0)


# --- clipping and sensitivity -----------------------------------------------------------------------

def test_clipping_bounds_long_rows_and_leaves_short_ones_alone():
    x = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_to_norm(x, 1.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], rtol=1e-12)
    np.testing.assert_array_equal(clipped[1:], x[1:])


def test_tokens_embeddings_are_clipped_as_one_vector_per_sample():
    x = np.full((2, 77, 8), 0.1)  # every token has norm 0.28 < 1, the whole sample 2.48 > 1
    clipped = clip_to_norm(x, 1.0)
    assert clipped.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(clipped.reshape(2, -1), axis=1), [1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(clipped, x / np.linalg.norm(x[0]), rtol=1e-12)  # scaled, direction kept


def test_center_is_subtracted_before_clipping_and_added_back():
    center = np.full(4, 10.0)
    x = center + np.array([[0.1, 0, 0, 0], [0, 3.0, 0, 0]])
    # Relative to the center the first row is inside the ball and the second is cut to norm 1.
    np.testing.assert_allclose(clipped_mean(x, clip_norm=1.0, center=center), [10.05, 10.5, 10, 10])


@pytest.mark.parametrize("n", [10, 17])
def test_replacing_one_image_moves_the_release_by_at_most_2c_over_n_pub(n):
    rng = np.random.default_rng(0)
    clip_norm, n_pub = 0.5, 10
    bound = mean_sensitivity(clip_norm=clip_norm, min_images=n_pub)
    x = rng.normal(size=(n, 32)) * rng.uniform(0.1, 3.0, size=(n, 1))  # some rows inside, some outside the ball
    release = clipped_mean(x, clip_norm=clip_norm)
    shifts = []
    for _ in range(300):
        neighbour = x.copy()
        j = rng.integers(n)
        neighbour[j] = rng.normal(size=32) * rng.uniform(0.1, 100.0)
        shifts.append(np.linalg.norm(clipped_mean(neighbour, clip_norm=clip_norm) - release))
    assert max(shifts) <= bound + 1e-12
    # A clipped row replaced by its opposite moves the mean by exactly 2C/n: the bound is tight at n = n_pub.
    x[0] = np.full(32, 1.0)  # norm 5.7: clipped to C
    neighbour = x.copy()
    neighbour[0] = -x[0]
    worst = np.linalg.norm(clipped_mean(neighbour, clip_norm=clip_norm) - clipped_mean(x, clip_norm=clip_norm))
    assert worst == pytest.approx(2 * clip_norm / n, rel=1e-9)


# --- the release ------------------------------------------------------------------------------------

def test_noise_has_the_stated_sigma():
    rng = np.random.default_rng(1)
    classes = [unit_rows(rng, n, 512) for n in rng.integers(10, 40, size=60)]
    noisy, record = privatize_class_means(classes, rng=np.random.default_rng(2), **PARAMETERS)
    noise = noisy.astype(np.float64) - np.stack([clipped_mean(x, clip_norm=1.0) for x in classes])
    assert record.sigma == pytest.approx(3.7306 * 2 / 10, rel=1e-4)
    assert noise.std() == pytest.approx(record.sigma, rel=0.02)  # 30,720 draws: std error ~0.4%
    assert abs(noise.mean()) < 0.02 * record.sigma


def test_record_states_what_was_applied_with_the_public_minimum_not_the_true_counts():
    rng = np.random.default_rng(3)
    classes = [unit_rows(rng, 10, 16), unit_rows(rng, 250, 16)]
    noisy, record = privatize_class_means(classes, rng=np.random.default_rng(0), **PARAMETERS)
    assert noisy.shape == (2, 16) and noisy.dtype == np.float32
    assert isinstance(record, DpRecord)
    assert record.as_dict() == {
        "mechanism": "gaussian, analytic calibration (Balle & Wang 2018)", "neighbouring": "replace-one",
        "epsilon": 1.0, "delta": 1e-5, "sigma": record.sigma, "sensitivity": 0.2, "clip_norm": 1.0,
        "min_images": 10,
    }
    assert record.sigma == gaussian_sigma(1.0, 1e-5, 0.2)


def test_a_seeded_generator_makes_the_release_reproducible():
    classes = [unit_rows(np.random.default_rng(4), 12, 8)]
    first, _ = privatize_class_means(classes, rng=np.random.default_rng(7), **PARAMETERS)
    again, _ = privatize_class_means(classes, rng=np.random.default_rng(7), **PARAMETERS)
    other, _ = privatize_class_means(classes, rng=np.random.default_rng(8), **PARAMETERS)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_keyed_generator_repeats_noise_only_for_the_same_key_data_and_parameters():
    key = bytes(range(32))
    captions = b"cat: a cat on a mat|a black cat"

    def draw(secret=key, data=captions, parameters=PARAMETERS):
        return keyed_generator(secret, data=data, parameters=parameters).normal(size=4)

    np.testing.assert_array_equal(draw(), draw())
    changed = captions.replace(b"black", b"white")
    for different in (draw(secret=bytes(32)), draw(data=changed), draw(parameters={**PARAMETERS, "epsilon": 2.0})):
        assert not np.allclose(different, draw())
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        keyed_generator(b"short", data=captions, parameters=PARAMETERS)


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"epsilon": 0.0}, "dp-epsilon must be a finite number > 0"),
    ({"epsilon": -1.0}, "dp-epsilon must be a finite number > 0"),
    ({"epsilon": math.inf}, "dp-epsilon must be a finite number > 0"),
    ({"delta": 0.0}, "dp-delta must lie strictly between 0 and 1"),
    ({"delta": 1.0}, "dp-delta must lie strictly between 0 and 1"),
    ({"min_images": 0}, "min_images .* must be an integer >= 1"),
    ({"min_images": 2.5}, "min_images .* must be an integer >= 1"),
    ({"clip_norm": 0.0}, "clip_norm must be a finite number > 0"),
    ({"min_images": 13}, r"classes at positions \[0\] have fewer than min_images=13"),
])
def test_bad_parameters_are_rejected_with_the_reason(change, message):
    classes = [np.ones((12, 4)) / 2, np.ones((20, 4)) / 2]
    with pytest.raises(ValueError, match=message):
        privatize_class_means(classes, rng=np.random.default_rng(0), **{**PARAMETERS, **change})


def test_bad_embeddings_are_rejected_with_the_reason():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="one shape"):
        privatize_class_means([np.ones((10, 4)), np.ones((10, 5))], rng=rng, **PARAMETERS)
    with pytest.raises(ValueError, match="NaN or infinity"):
        privatize_class_means([np.full((10, 4), np.nan)], rng=rng, **PARAMETERS)
    with pytest.raises(ValueError, match="center has shape"):
        privatize_class_means([np.ones((10, 4))], rng=rng, center=np.zeros(3), **PARAMETERS)
    with pytest.raises(ValueError, match="no classes"):
        privatize_class_means([], rng=rng, **PARAMETERS)
