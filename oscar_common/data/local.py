"""A client's local image data: folder scanning, train/test splits, split files, image loading.

Each client holds one domain (as in the paper's DomainNet / NICO++ setups) laid out as
``<data-dir>/<class_name>/<images>``. Everything here is deterministic (sorted listings, seeded
splits) so a client that restarts sees the same data, and never crashes on one bad file: unreadable
images are skipped, counted and logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)
_LAYOUT = "<data-dir>/<class_name>/<image files> (e.g. data/cat/001.jpg)"


class DataDirError(ValueError):
    """A client's data directory or split file is missing, empty or malformed."""


@dataclass(frozen=True)
class Sample:
    path: Path
    class_name: str


@dataclass
class ScanResult:
    root: Path
    samples: list[Sample]
    unknown_classes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per class, for the classes that have any."""
        out: dict[str, int] = {}
        for sample in self.samples:
            out[sample.class_name] = out.get(sample.class_name, 0) + 1
        return out


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _check_root(root: Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataDirError(f"data directory {root} does not exist; expected layout {_LAYOUT}")
    if not root.is_dir():
        raise DataDirError(f"data directory {root} is not a directory; expected layout {_LAYOUT}")
    return root


def scan_image_folder(root: Path, class_names: Sequence[str]) -> ScanResult:
    """List ``root/<class>/**/<image>`` files of the classes in ``class_names``, sorted by (class, relative path).

    Folders not in ``class_names`` are skipped (and reported in ``unknown_classes``); classes of
    ``class_names`` without a folder are simply absent. Hidden files and folders are ignored.
    """
    root = _check_root(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    if not folders:
        raise DataDirError(f"no class folders in {root}; expected layout {_LAYOUT}")
    wanted = set(class_names)
    unknown = [p.name for p in folders if p.name not in wanted]
    if len(unknown) == len(folders):
        raise DataDirError(
            f"none of the {len(folders)} class folders of {root} is a class of this federation: folders "
            f"{_few(unknown)}; the federation's class-names {_few(sorted(wanted))}. Check the server's class-names "
            "and the folders' spelling (names must match exactly, case included)")
    if unknown:
        logger.warning("%s: skipping %d folder(s) that are not known classes: %s",
                       root, len(unknown), ", ".join(unknown))
    samples: list[Sample] = []
    for folder in folders:
        if folder.name in unknown:
            continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _hidden(d)]  # prune hidden subfolders
            for name in filenames:
                path = Path(dirpath) / name
                if not _hidden(name) and _is_image(path):
                    samples.append(Sample(path, folder.name))
    if not samples:
        searched = [p.name for p in folders if p.name not in unknown]
        raise DataDirError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {root} "
            f"(searched: {', '.join(searched) or 'none'}); expected layout {_LAYOUT}"
        )
    samples.sort(key=lambda s: (s.class_name, s.path.relative_to(root).as_posix()))
    return ScanResult(root=root, samples=samples, unknown_classes=unknown)


def _few(names: Sequence[str], shown: int = 5) -> str:
    listed = ", ".join(repr(n) for n in list(names)[:shown])
    return f"{listed} (+{len(names) - shown} more)" if len(names) > shown else listed


def _class_seed(seed: int, class_name: str) -> int:
    # Python's hash() is salted per process; a digest keeps splits stable across runs.
    digest = hashlib.sha256(f"{seed}:{class_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def stratified_split(
    samples: Sequence[Sample], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split each class into train/test, deterministically from (seed, class, file paths).

    A class with one image keeps it for training; a class with >= 2 images gives at least one to
    each side. Input order does not matter; both outputs are sorted by (class, path).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[str, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.class_name, []).append(sample)
    train: list[Sample] = []
    test: list[Sample] = []
    for class_name, members in by_class.items():
        members = sorted(members, key=lambda s: s.path.as_posix())  # independent of listing order
        random.Random(_class_seed(seed, class_name)).shuffle(members)
        n = len(members)
        n_test = min(max(round(n * test_fraction), 1), n - 1) if n >= 2 else 0
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    key = lambda s: (s.class_name, s.path.as_posix())  # noqa: E731
    return sorted(train, key=key), sorted(test, key=key)


def read_split_file(path: Path, root: Path) -> list[Sample]:
    """Read a split file: one ``<class_name>/<file>`` path per line, relative to ``root`` (blank lines and
    ``#`` comments skipped)."""
    path, root = Path(path), _check_root(root)
    if not path.is_file():
        raise DataDirError(f"split file {path} does not exist")
    samples: list[Sample] = []
    missing: list[str] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rel = Path(line)
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) < 2:
            raise DataDirError(
                f"{path}:{lineno}: {line!r} must be a path relative to {root} of the form "
                "<class_name>/<file>"
            )
        full = root / rel
        if not full.is_file():
            missing.append(line)
        samples.append(Sample(full, rel.parts[0]))
    if missing:
        raise DataDirError(
            f"{path}: {len(missing)} listed file(s) not found under {root}, e.g. {missing[:3]}"
        )
    return samples


def load_client_split(
    root: Path,
    class_names: Sequence[str],
    test_fraction: float = 0.2,
    seed: int = 0,
    train_list: Path | None = None,
    test_list: Path | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """A client's (train, test) samples: from split files when given, else :func:`stratified_split`.

    With only one split file, the other side is every scanned image not in it. Classes outside
    ``class_names`` are dropped with a warning.
    """
    if train_list is None and test_list is None:
        return stratified_split(scan_image_folder(root, class_names).samples, test_fraction, seed)
    train = read_split_file(train_list, root) if train_list is not None else None
    test = read_split_file(test_list, root) if test_list is not None else None
    if train is None or test is None:
        given = {s.path for s in (train if train is not None else test)}
        rest = [s for s in scan_image_folder(root, class_names).samples if s.path not in given]
        train, test = (train, rest) if train is not None else (rest, test)
    wanted = set(class_names)
    dropped = sorted({s.class_name for s in train + test} - wanted)
    if dropped:
        logger.warning("%s: split files list unknown classes, skipped: %s", root, ", ".join(dropped))
        train = [s for s in train if s.class_name in wanted]
        test = [s for s in test if s.class_name in wanted]
    overlap = {s.path for s in train} & {s.path for s in test}
    if overlap:
        logger.warning("%s: %d image(s) are in both the train and the test split", root, len(overlap))
    return train, test


# What reading an image file can raise: UnidentifiedImageError is an OSError; truncated files raise OSError on
# decode. Every path that reads images skips (and names) these instead of crashing.
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # convert() forces the full decode, so corrupt data fails here


class ImageListDataset(Dataset):
    """``(transform(image), label)`` items from ``(image file, label)`` pairs, decoded as RGB.

    With ``skip_unreadable``, an image that cannot be decoded is logged and yields ``None`` instead of
    raising; :func:`collate_readable` drops those from the batch and counts them, so one corrupt file
    never stops a training or an evaluation.
    """

    def __init__(
        self,
        items: Sequence[tuple[Path | str, int]],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_unreadable: bool = False,
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.skip_unreadable = skip_unreadable

    @classmethod
    def from_samples(
        cls,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_unreadable: bool = False,
    ) -> "ImageListDataset":
        """Label each sample by its class's index in ``class_names``."""
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted({s.class_name for s in samples} - index.keys())
        if unknown:
            raise DataDirError(f"samples of classes not in class_names: {', '.join(unknown)}")
        return cls([(s.path, index[s.class_name]) for s in samples], transform, skip_unreadable)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        source, label = self.items[i]
        try:
            image = open_rgb(Path(source))
        except UNREADABLE as exc:
            if self.skip_unreadable:
                logger.warning("skipping unreadable image %s: %s", source, exc)
                return None
            raise OSError(f"cannot read image {source}: {exc}") from exc  # name the file: PIL does not
        return self.transform(image), label


def collate_readable(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable items of a batch; returns (inputs, labels, number of unreadable items dropped)."""
    readable = [item for item in batch if item is not None]
    if not readable:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    inputs, labels = default_collate(readable)
    return inputs, labels, len(batch) - len(readable)
