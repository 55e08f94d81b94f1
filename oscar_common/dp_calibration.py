"""How much Gaussian noise a differentially private class mean needs: one calibration, two users.

The client sizes its noise with these functions (``oscar_client.privacy`` describes the release and why
its sensitivity is ``2C/n_pub``); the server checks with the very same functions that what a client
declares adds up (``oscar_common.wire``), so the two can never disagree about the arithmetic.
"""

from __future__ import annotations

import math

MECHANISM = "gaussian, analytic calibration (Balle & Wang 2018)"
NEIGHBOURING = "replace-one"


def mean_sensitivity(*, clip_norm: float, min_images: int) -> float:
    """L2 sensitivity under replace-one of a mean of >= ``min_images`` samples clipped to ``clip_norm``."""
    check_positive("clip_norm", clip_norm)
    check_min_images(min_images)
    return 2.0 * clip_norm / min_images


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest noise std making the Gaussian mechanism (epsilon, delta)-DP (analytic Gaussian mechanism)."""
    check_epsilon(epsilon)
    check_delta(delta)
    check_positive("sensitivity", sensitivity)
    import dp_accounting  # on first use: 0.7 s of imports that a server or client without DP never needs

    # dp-accounting calibrates sensitivity 1; the mechanism is scale-invariant, so sigma scales with Delta.
    return sensitivity * float(dp_accounting.get_sigma_gaussian(epsilon, delta))


def check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_epsilon(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"dp-epsilon must be a finite number > 0, got {epsilon!r} (smaller means more private)")


def check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"dp-delta must lie strictly between 0 and 1, got {delta!r} "
                         "(choose it well below 1/number-of-images, e.g. 1e-5)")


def check_min_images(min_images: int) -> None:
    if isinstance(min_images, bool) or int(min_images) != min_images or min_images < 1:
        raise ValueError(f"min_images (the server's min-images-per-class) must be an integer >= 1, got {min_images!r}")
