"""Differential privacy for the per-class means a client uploads: the Gaussian mechanism, calibrated exactly.

What is protected. The neighbouring relation is *replace-one*: two data sets of a client are neighbours
when they differ in the caption embedding of one image, with every image keeping its class. A release is
(epsilon, delta)-DP if no such change moves the probability of any outcome by more than the usual factor.

The release. For each class with ``n >= n_pub`` images the client uploads

    mean_c = center + (1/n) * sum_i clip_C(x_i - center)   +   N(0, sigma^2 I)

where ``clip_C`` scales each sample (flattened: a ``[77, H]`` tokens embedding is one vector) to L2 norm
at most ``C``, ``center`` is a public vector (zero by default) and ``n_pub`` is the server's minimum number
of images per class, a public number (``clip_norm`` and ``min_images`` in the code). Why the L2
sensitivity of this release is at most ``2C / n_pub``:

* replacing image j changes only the term ``clip_C(x_j - center)``, and both versions lie in the ball of
  radius C, so the sum moves by at most 2C and the mean by at most ``2C/n <= 2C/n_pub`` (n is unchanged);
* sigma is calibrated to ``2C/n_pub``, a public bound, so neither sigma nor anything else on the wire
  depends on the true n, which is never released. (Under add/remove-one the same mean moves by at most
  ``2C/(n_pub + 1)`` while the class stays at >= n_pub images; the one thing not covered is whether a
  class is uploaded at all, i.e. the bit ``n >= n_pub``.)

We chose the mean over *all* n images rather than the mean of a random subset of exactly n_pub: both have
sensitivity 2C/n_pub, but the full mean has less sampling error for the same noise. The cost is that noise
is sized for the smallest allowed class: a class with 1000 images gets as much noise as one with n_pub.
The noise is large in these dimensions: its expected norm is about ``sigma * sqrt(D)``. For pooled CLIP
(D = 512, C = 1) at epsilon = 1, delta = 1e-5 and n_pub = 10, sigma = 0.746 and the noise norm is ~17,
against a mean of norm <= 1; n_pub = 100 brings it to ~1.7.

Choosing C. Pooled CLIP embeddings are unit vectors, so C = 1 with no center clips nothing. ``tokens``
embeddings (``[77, H]`` hidden states after a LayerNorm) are far longer than 1, and clipping them to 1
would shrink them to nothing: there the center is the empty prompt's encoding (public) and C must be set
explicitly (``ClientPolicy.clip_norm`` refuses otherwise), near the typical norm of ``x - center`` on
public captions (``oscar_client.clip_norm``). Noise grows with C, so a good center pays.

Calibration (``oscar_common.dp_calibration``, shared with the server, which checks a declared record
with it). sigma comes from the analytic Gaussian mechanism (Balle & Wang, ICML 2018, arXiv 1805.06530,
Thm. 8): the smallest sigma for which the Gaussian mechanism of sensitivity Delta is (epsilon, delta)-DP,
computed by Google's ``dp-accounting`` (``get_sigma_gaussian``). It is exact for
every epsilon, unlike the classic ``sqrt(2 ln(1.25/delta)) * Delta / epsilon`` (Dwork & Roth 2014,
Thm. A.1), which needs epsilon < 1 and is looser (4.84 against 3.73 at epsilon = 1, delta = 1e-5).

Composition. Each image belongs to one class and each class mean is released once, so the releases touch
disjoint parts of the data (parallel composition): the client's guarantee is the per-class
(epsilon, delta), however many classes it has. This needs the partition to be fixed by each image's own
label. It does NOT hold for k-means prototypes (see ``prototypes.py``): which cluster an image falls in
depends on the other images, so one replaced image can move many others between clusters and shift a
prototype by far more than 2C/min_size. Do not combine DP with more than one prototype per class.
Releasing again with fresh noise composes; ``keyed_generator`` makes a repeated upload of the same data
under the same parameters repeat the same noise, so a retry costs nothing, and ``oscar_client.ledger``
composes the distinct releases of a client's data (``release_id`` names each by its noise).

Assumptions: ``center`` and all parameters are fixed without looking at the client's data; the noise is
secret (never seed it from anything the server knows: use ``keyed_generator`` with a key that stays on the
client, or ``np.random.default_rng()``); with ``keyed_generator`` the guarantee rests on the key, whose
holder can recompute the noise of a guessed data set for every release made with it (docs/privacy.md);
floating-point sampling from numpy's PCG64 is the usual practical approximation of exact Gaussian noise (as
in Opacus without its secure mode).
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np

# The calibration is shared with the server, which checks a declared record with the same functions.
from oscar_common.dp_calibration import (
    MECHANISM,
    NEIGHBOURING,
    check_positive,
    gaussian_sigma,
    mean_sensitivity,
)
from oscar_common.wire import DpRecord  # what was applied: goes on the wire and into the report

__all__ = ["DpRecord", "MECHANISM", "NEIGHBOURING", "clip_to_norm", "clipped_mean", "gaussian_sigma",
           "keyed_generator", "mean_sensitivity", "noise_seed", "privatize_class_means", "release_id"]


def clip_to_norm(x: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale each sample of ``x`` (``[N, ...]``, flattened per sample) to L2 norm at most ``max_norm``.

    Samples already inside the ball are returned unchanged; float64 out.
    """
    check_positive("max_norm", max_norm)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1:
        raise ValueError("clip_to_norm needs an [N, ...] array of samples, got a scalar")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or infinity: check the encoder's output before privatizing")
    norms = np.linalg.norm(x.reshape(len(x), -1), axis=1)
    scale = np.minimum(1.0, max_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    return x * scale.reshape(-1, *([1] * (x.ndim - 1)))


def clipped_mean(embeddings: np.ndarray, *, clip_norm: float, center: np.ndarray | None = None) -> np.ndarray:
    """``center + mean(clip(x - center))``: the noiseless part of a release, float64 ``[...]``."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    offset = np.zeros(embeddings.shape[1:]) if center is None else np.asarray(center, dtype=np.float64)
    if offset.shape != embeddings.shape[1:]:
        raise ValueError(f"center has shape {offset.shape} but each embedding has shape {embeddings.shape[1:]}")
    return offset + clip_to_norm(embeddings - offset, clip_norm).mean(axis=0)


def privatize_class_means(
    class_embeddings: Sequence[np.ndarray],
    *,
    epsilon: float,
    delta: float,
    clip_norm: float,
    min_images: int,
    rng: np.random.Generator,
    center: np.ndarray | None = None,
) -> tuple[np.ndarray, DpRecord]:
    """Noisy per-class means, one per entry of ``class_embeddings`` (each ``[n_c, ...]`` with n_c >= min_images).

    Returns the float32 means ``[K, ...]`` in input order and the :class:`DpRecord` of what was applied.
    Classes below ``min_images`` must be dropped by the caller before this (they are not uploaded at all).
    """
    sensitivity = mean_sensitivity(clip_norm=clip_norm, min_images=min_images)
    sigma = gaussian_sigma(epsilon, delta, sensitivity)
    _check_classes(class_embeddings, min_images)
    means = np.stack([clipped_mean(x, clip_norm=clip_norm, center=center) for x in class_embeddings])
    noisy = means + rng.normal(0.0, sigma, size=means.shape)
    record = DpRecord(mechanism=MECHANISM, neighbouring=NEIGHBOURING, epsilon=float(epsilon),
                      delta=float(delta), sigma=sigma, sensitivity=sensitivity, clip_norm=float(clip_norm),
                      min_images=int(min_images))
    return noisy.astype(np.float32), record


def keyed_generator(secret_key: bytes, *, data: bytes, parameters: Mapping[str, object]) -> np.random.Generator:
    """A noise generator determined by a client-held secret, the data and the DP parameters.

    ``data`` identifies the released data exactly (the client passes a digest of its captions per class:
    captions reproduce bit for bit, float embeddings may not across processes). The same data under the
    same parameters get the same noise, so uploading again (a retry, the preview followed by the upload)
    releases nothing new. Any change to the data or to the parameters gives independent-looking noise:
    reusing noise across different data or sigmas would let the server cancel it.
    """
    return np.random.default_rng(int.from_bytes(noise_seed(secret_key, data=data, parameters=parameters), "little"))


def noise_seed(secret_key: bytes, *, data: bytes, parameters: Mapping[str, object]) -> bytes:
    """The 32-byte seed of :func:`keyed_generator`: a keyed PRF (BLAKE2b) of the data and the parameters.

    Whoever holds the key and guesses the data can recompute it, and with it the noise: keep it secret.
    """
    if len(secret_key) < 16:
        raise ValueError("secret_key must hold at least 16 random bytes (e.g. secrets.token_bytes(32))")
    digest = hashlib.blake2b(key=secret_key[:64], digest_size=32)
    digest.update(data)
    digest.update(repr(sorted(parameters.items())).encode())
    return digest.digest()


def release_id(secret_key: bytes, *, data: bytes, parameters: Mapping[str, object]) -> str:
    """Names the noise of a release without revealing it: equal exactly when :func:`keyed_generator` draws
    the same noise (same key, data and parameters). A one-way hash of the seed, safe to write down."""
    return hashlib.sha256(b"oscar release\x00" + noise_seed(secret_key, data=data, parameters=parameters)).hexdigest()


def _check_classes(class_embeddings: Sequence[np.ndarray], min_images: int) -> None:
    if len(class_embeddings) == 0:
        raise ValueError("no classes to privatize")
    shapes = {np.shape(x)[1:] for x in class_embeddings}
    if len(shapes) != 1:
        raise ValueError(f"all classes must have embeddings of one shape, got {sorted(shapes)}")
    small = [i for i, x in enumerate(class_embeddings) if len(x) < min_images]
    if small:
        raise ValueError(f"classes at positions {small} have fewer than min_images={min_images} embeddings: "
                         "drop them before privatizing (the sensitivity bound 2C/min_images needs n >= min_images)")
