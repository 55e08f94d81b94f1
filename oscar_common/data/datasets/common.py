"""What every benchmark adapter shares: its options, the adapter base class, official split lists,
class subsets and per-class shots."""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Mapping, Sequence

from oscar_common.data.local import IMAGE_EXTENSIONS, DataDirError, Sample, stratified_split
from oscar_common.node_config import NodeConfig

logger = logging.getLogger("oscar_common.data.datasets")


class BenchmarkError(DataDirError):
    """A benchmark's root, split file, client or class subset is missing, unknown or malformed."""


@dataclass(frozen=True)
class ClientPartition:
    """One client's share of a benchmark, restricted to the run's classes."""

    name: str
    train: list[Sample]
    test: list[Sample]
    skipped_classes: list[str] = field(default_factory=list)  # the client's classes not in the run


@dataclass(frozen=True)
class BenchmarkOptions:
    """The node-config keys that pick a benchmark and this client's share of it (declared, with their
    defaults, in ``oscar_common.node_config``)."""

    benchmark: str
    root: Path
    client: str | None = None
    client_index: int | None = None
    train_shots: int = NodeConfig.train_shots  # images per class kept for training (0: all), in listing order
    test_shots: int = NodeConfig.test_shots
    test_fraction: float = NodeConfig.test_fraction  # folder benchmarks without test-root: seeded split
    test_root: Path | None = None  # folder benchmarks: a second tree of the same layout, the test split
    split_dir: Path | None = None  # list benchmarks: where the official split files are
    num_clients: int = NodeConfig.num_clients  # label-skew
    alpha: float = NodeConfig.alpha  # label-skew: Dirichlet concentration

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BenchmarkOptions":
        try:
            node = NodeConfig.from_values(config)
        except ValueError as exc:  # a bad value of this node's benchmark is a problem with its data
            raise BenchmarkError(str(exc)) from None
        if not node.benchmark:
            raise BenchmarkError("no 'benchmark' given (e.g. benchmark='domainnet')")
        if not node.benchmark_root:
            raise BenchmarkError(f"benchmark {node.benchmark!r} needs 'benchmark-root' (the dataset's folder)")
        # Local simulation gives only partition-id / num-partitions: they stand in for the client's keys.
        return cls(
            benchmark=node.benchmark,
            root=Path(node.benchmark_root).expanduser(),
            client=node.client or None,
            client_index=node.client_index if node.client_index is not None else node.partition_id,
            train_shots=node.train_shots,
            test_shots=node.test_shots,
            test_fraction=node.test_fraction,
            test_root=_optional_path(node.test_root),
            split_dir=_optional_path(node.split_dir),
            num_clients=node.num_clients or node.num_partitions or 0,
            alpha=node.alpha,
        )


def _optional_path(value: Any) -> Path | None:
    return Path(str(value)).expanduser() if value else None


class Benchmark(ABC):
    """A data set split into clients. Subclasses read one official layout."""

    # Named class subsets: name -> benchmark labels, in the order that becomes the run's class ids.
    subsets: ClassVar[Mapping[str, Sequence[int]]] = {}

    def __init__(self, options: BenchmarkOptions, seed: int = 0) -> None:
        if not options.root.is_dir():
            raise BenchmarkError(f"{options.benchmark} root {options.root} does not exist or is not a folder")
        self.options = options
        self.seed = seed

    @abstractmethod
    def labelled_classes(self) -> dict[int, str]:
        """Every class of the benchmark by its label (the index a class subset refers to)."""

    @abstractmethod
    def clients(self) -> list[str]:
        """Client names, in the order ``client-index`` counts."""

    @abstractmethod
    def client_samples(self, client: str) -> tuple[list[Sample], list[Sample]]:
        """All of one client's (train, test) samples, in listing order, before class filtering and shots."""

    def resolve_client(self) -> str:
        known = self.clients()
        name, index = self.options.client, self.options.client_index
        if name is not None:
            if name not in known:
                raise BenchmarkError(f"unknown {self.options.benchmark} client {name!r}; known: {', '.join(known)}")
            return name
        if index is None:
            raise BenchmarkError(f"name this node's {self.options.benchmark} client with client='<name>' or "
                                 f"client-index=<k>; known: {', '.join(known)}")
        if not 0 <= index < len(known):
            raise BenchmarkError(f"client-index {index} is out of range: {self.options.benchmark} has "
                                 f"{len(known)} clients ({', '.join(known)})")
        return known[index]

    def folder_split(self, samples_of: Any) -> tuple[list[Sample], list[Sample]]:
        """(train, test) of a folder benchmark: ``samples_of(tree)`` on root and test-root, else a seeded
        stratified split of the root's samples."""
        train = samples_of(self.options.root)
        if self.options.test_root is not None:
            return train, samples_of(self.options.test_root)
        return stratified_split(train, self.options.test_fraction, self.seed)


def numbered_clients(count: int) -> list[str]:
    return [f"client-{k}" for k in range(count)]


# --------------------------------------------------------------------------- official split lists

@dataclass(frozen=True)
class ListEntry:
    """One line of an official split file: ``<prefix>/<a>/<b>/<file> <label>``."""

    path: Path
    class_name: str
    group: str  # the domain
    label: int

    def sample(self) -> Sample:
        return Sample(self.path, self.class_name)


def read_list_file(path: Path, image_root: Path, layout: str, group: str | None = None) -> list[ListEntry]:
    """Read an official split file; each image is ``image_root/<a>/<b>/<file>`` from the line's last
    three path components, whatever prefix the line carries (the official lists differ in it).

    ``layout`` names the two folders: ``"group/class"`` (DomainNet, NICO++ DG) or ``"class/group"``
    (NICO++ unique). Hidden files (``.DS_Store`` lines) are skipped. With ``group``, every line must be
    of that domain (a wrong file fails here rather than mixing domains).
    """
    if not path.is_file():
        raise BenchmarkError(f"split file {path} does not exist")
    entries: list[ListEntry] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rel, _, label = line.rpartition(" ")
        parts = PurePosixPath(rel.strip()).parts
        if not label.isdigit() or len(parts) < 3:
            raise BenchmarkError(f"{path}:{lineno}: {line!r} is not '<folders>/<a>/<b>/<file> <label>'")
        a, b, name = parts[-3:]
        if name.startswith("."):
            continue
        entry_group, class_name = (a, b) if layout == "group/class" else (b, a)
        if group is not None and entry_group != group:
            raise BenchmarkError(f"{path}:{lineno}: image of domain {entry_group!r} in the list of {group!r}")
        entries.append(ListEntry(image_root / a / b / name, class_name, entry_group, int(label)))
    return entries


def find_split_file(name: str, folders: Sequence[Path], hint: str) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise BenchmarkError(f"split file {name} not found in {' or '.join(str(f) for f in folders)}; {hint}")


# --------------------------------------------------------------------------- folders

def images_under(folder: Path) -> list[Path]:
    """Every visible image file below ``folder`` (same extensions as client folders), sorted as paths sort."""
    return [folder.joinpath(*parts) for parts in image_parts_under(folder)]


def image_parts_under(folder: Path) -> list[tuple[str, ...]]:
    """:func:`images_under` as path parts relative to ``folder``, without building a path per image.

    Every client of a ``label-skew`` benchmark lists the whole tree to find its share (twice a run: upload
    and evaluation), so with N clients this runs over every image 2N times. ``os.scandir`` hands over
    each entry's type with the directory listing; pathlib's ``rglob`` + ``is_file`` cost a stat and
    several path objects per file (~40 us per image here, 7x this), and even one ``Path`` per image is
    most of the listing's time at 50,000 images. Folders reached through a symlink are not entered (as
    ``rglob``); hidden files and folders are skipped.
    """
    found: list[tuple[str, ...]] = []  # parts relative to folder: tuples sort exactly as the paths do

    def walk(directory: str, parts: tuple[str, ...]) -> None:
        try:
            entries = list(os.scandir(directory))
        except PermissionError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path, (*parts, entry.name))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                found.append((*parts, entry.name))

    walk(os.fspath(folder), ())
    return sorted(found)


def subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise BenchmarkError(f"{folder} does not exist or is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# --------------------------------------------------------------------------- classes and shots

_INDEX_RANGES = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def select_classes(benchmark: Benchmark, subset: str = "") -> list[str]:
    """The class names of a subset, in class-id order.

    ``subset``: empty or ``all`` (every class, by label); a named subset of the benchmark (DomainNet:
    ``oscar90``, ``fedcado90``); label ranges such as ``0-29,40-89``; or comma-separated class names.
    """
    labelled = benchmark.labelled_classes()
    spec = subset.replace(" ", "")
    if spec in ("", "all"):
        names = [labelled[label] for label in sorted(labelled)]
    elif spec in benchmark.subsets or _INDEX_RANGES.match(spec):
        labels = benchmark.subsets.get(spec) or _parse_ranges(spec)
        missing = [label for label in labels if label not in labelled]
        if missing:
            raise BenchmarkError(f"{benchmark.options.benchmark} has no class with label(s) {missing[:10]} "
                                 f"(labels found: {min(labelled)}-{max(labelled)}, {len(labelled)} classes)")
        names = [labelled[label] for label in labels]
    else:
        names = [name for name in subset.split(",") if name.strip()]
        unknown = [name for name in names if name not in labelled.values()]
        if unknown:
            presets = ", ".join(["all", *benchmark.subsets])
            raise BenchmarkError(f"unknown {benchmark.options.benchmark} class(es) {unknown[:10]}: a subset is "
                                 f"one of {presets}, label ranges like 0-29,40-89, or class names")
    if len(set(names)) != len(names):
        raise BenchmarkError(f"class subset {subset!r} names a class twice")
    bad = [name for name in names if "," in name]
    if bad:
        raise BenchmarkError(f"class names with commas cannot go into the run's class-names: {bad}")
    return names


def _parse_ranges(spec: str) -> list[int]:
    labels: list[int] = []
    for item in spec.split(","):
        first, _, last = item.partition("-")
        labels.extend(range(int(first), int(last or first) + 1))
    return labels


def take_shots(samples: Sequence[Sample], shots: int) -> list[Sample]:
    """The first ``shots`` samples of each class, keeping the listing order (0: all)."""
    if shots <= 0:
        return list(samples)
    taken: dict[str, int] = {}
    kept = []
    for sample in samples:
        if taken.get(sample.class_name, 0) < shots:
            taken[sample.class_name] = taken.get(sample.class_name, 0) + 1
            kept.append(sample)
    return kept
