"""Benchmarks read from plain folder trees: any multi-domain tree, OpenImage as FedCADO/OSCAR use it,
and Dirichlet label-skew partitions of a single-domain tree.

``domains``:    ``<root>/<domain>/<class>/<images>``; one domain per client (sorted).
``openimage``:  ``<root>/<super-class>/<sub-class>/<images>``; client k holds the k-th sub-class (sorted)
                of every super-class, labelled with the super-class.
``label-skew``: ``<root>/<class>/<images>``; each class is spread over ``num-clients`` clients with
                proportions drawn from Dirichlet(``alpha``), seeded; every image goes to exactly one client.

Test data: with ``test-root`` (a second tree of the same layout, e.g. the official test split) the
client's test samples come from it, partitioned the same way; otherwise the client's samples are split
by the seeded stratified split of ``oscar_common.data.local`` (``test-fraction``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from oscar_common.data.datasets.common import (
    Benchmark,
    BenchmarkError,
    image_parts_under,
    images_under,
    logger,
    numbered_clients,
    subfolders,
)
from oscar_common.data.local import Sample, _class_seed


class DomainFolders(Benchmark):
    def clients(self) -> list[str]:
        domains = [p.name for p in subfolders(self.options.root)]
        if not domains:
            raise BenchmarkError(f"no domain folders in {self.options.root}: expected <root>/<domain>/<class>/")
        return domains

    def labelled_classes(self) -> dict[int, str]:
        names = {c.name for d in self.clients() for c in subfolders(self.options.root / d)}
        return dict(enumerate(sorted(names)))

    def client_samples(self, client: str) -> tuple[list[Sample], list[Sample]]:
        return self.folder_split(lambda tree: [
            Sample(path, folder.name) for folder in subfolders(tree / client) for path in images_under(folder)
        ])


class OpenImage(Benchmark):
    def clients(self) -> list[str]:
        return numbered_clients(max(len(subs) for subs in self._sub_classes(self.options.root).values()))

    def labelled_classes(self) -> dict[int, str]:
        return dict(enumerate(sorted(self._sub_classes(self.options.root))))

    def client_samples(self, client: str) -> tuple[list[Sample], list[Sample]]:
        k = self.clients().index(client)
        return self.folder_split(lambda tree: self._samples(tree, k, client))

    def _samples(self, tree: Path, k: int, client: str) -> list[Sample]:
        samples = []
        for super_class, subs in self._sub_classes(tree).items():
            if len(subs) <= k:
                logger.warning("OpenImage %s: super-class %r has no sub-class #%d, %s gets none of it",
                               tree, super_class, k, client)
                continue
            samples += [Sample(path, super_class) for path in images_under(subs[k])]
        return samples

    @staticmethod
    def _sub_classes(tree: Path) -> dict[str, list[Path]]:
        subs = {p.name: subfolders(p) for p in subfolders(tree)}
        if not any(subs.values()):
            raise BenchmarkError(f"no sub-class folders in {tree}: expected <root>/<super-class>/<sub-class>/")
        return subs


class LabelSkew(Benchmark):
    def clients(self) -> list[str]:
        if self.options.num_clients < 1:
            raise BenchmarkError("label-skew needs num-clients >= 1 (the number of clients to partition into)")
        return numbered_clients(self.options.num_clients)

    def labelled_classes(self) -> dict[int, str]:
        return dict(enumerate(p.name for p in subfolders(self.options.root)))

    def client_samples(self, client: str) -> tuple[list[Sample], list[Sample]]:
        k = self.clients().index(client)
        return self.folder_split(lambda tree: self.share(tree, k))

    def share(self, tree: Path, client: int) -> list[Sample]:
        """Client ``client``'s share of ``tree`` (only its own images become paths: at 1,000 clients building
        every share took 0.4 s per client, one share 0.1 s)."""
        samples: list[Sample] = []
        for folder, images, order, bounds in self._class_splits(tree):
            samples += [Sample(folder.joinpath(*images[i]), folder.name)
                        for i in sorted(order[bounds[client]:bounds[client + 1]])]
        return samples

    def partition(self, tree: Path) -> list[list[Sample]]:
        """Every client's share of ``tree``; the shares are disjoint and cover every image once."""
        shares: list[list[Sample]] = [[] for _ in range(self.options.num_clients)]
        for folder, images, order, bounds in self._class_splits(tree):
            for client, share in enumerate(shares):
                share += [Sample(folder.joinpath(*images[i]), folder.name)
                          for i in sorted(order[bounds[client]:bounds[client + 1]])]
        return shares

    def _class_splits(self, tree: Path) -> Iterator[tuple[Path, list[tuple[str, ...]], np.ndarray, np.ndarray]]:
        """Per class folder: its images (path parts), a seeded permutation of them, and the bounds in that
        permutation of each client's slice (client k gets ``order[bounds[k]:bounds[k + 1]]``)."""
        for folder in subfolders(tree):
            images = image_parts_under(folder)
            # The proportions depend only on (seed, class), so a test tree is split like the train tree.
            rng = np.random.default_rng(_class_seed(self.seed, folder.name))
            proportions = rng.dirichlet(np.full(self.options.num_clients, self.options.alpha))
            order = rng.permutation(len(images))
            cuts = np.round(np.cumsum(proportions) * len(images)).astype(int)
            cuts[-1] = len(images)
            yield folder, images, order, np.concatenate([[0], cuts])
