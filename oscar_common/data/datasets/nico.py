"""NICO++ in the two federated settings of FedCADO and OSCAR, read through the official split lists.

``nico-dg`` (the domain-generalisation "common" setting: 60 classes, one common domain per client)::

    <root>/NICO_DG/<domain>/<class>/<file>            domains: autumn dim grass outdoor rock water
    <root>/NICO_DG_official/<domain>_train.txt, <domain>_test.txt
        lines '<any prefix>/<domain>/<class>/<file> <label>'

``nico-unique`` (class-specific domains: client k holds the k-th domain, in sorted order, of every class)::

    <root>/NICO_unique/<class>/<domain>/<file>
    <root>/txtlist/NICO_unique_official/<class>_<domain>_train.txt, ..._test.txt
        lines '<any prefix>/<class>/<domain>/<file> <label>'

The image is found from the last three path components of a line, so the absolute paths of the
official lists work wherever the data now lives. ``split-dir`` overrides the list folder. Class ids
follow the sorted class names (as FedCADO does); the lists' own label column is not used.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from oscar_common.data.datasets.common import (
    Benchmark,
    BenchmarkError,
    ListEntry,
    find_split_file,
    logger,
    numbered_clients,
    read_list_file,
)
from oscar_common.data.local import Sample

DG_DOMAINS = ("autumn", "dim", "grass", "outdoor", "rock", "water")


class NicoDG(Benchmark):
    def clients(self) -> list[str]:
        return list(DG_DOMAINS)

    def labelled_classes(self) -> dict[int, str]:
        lists = [self._split_dir() / f"{d}_train.txt" for d in DG_DOMAINS]
        found = [path for path in lists if path.is_file()]
        if not found:
            self._entries(DG_DOMAINS[0], "train")  # raises, naming the file
        names = {e.class_name for path in found for e in read_list_file(path, self._images(), "group/class")}
        return dict(enumerate(sorted(names)))

    def client_samples(self, client: str) -> tuple[list[Sample], list[Sample]]:
        return ([e.sample() for e in self._entries(client, "train")],
                [e.sample() for e in self._entries(client, "test")])

    def _split_dir(self) -> Path:
        return self.options.split_dir or self.options.root / "NICO_DG_official"

    def _images(self) -> Path:
        return self.options.root / "NICO_DG"

    def _entries(self, domain: str, split: str) -> list[ListEntry]:
        path = find_split_file(f"{domain}_{split}.txt", [self._split_dir()],
                               "put the official NICO++ DG lists there or pass split-dir")
        return read_list_file(path, self._images(), "group/class", group=domain)


class NicoUnique(Benchmark):
    def clients(self) -> list[str]:
        return numbered_clients(max(len(domains) for domains in self._class_domains().values()))

    def labelled_classes(self) -> dict[int, str]:
        return dict(enumerate(sorted(self._class_domains())))

    def client_samples(self, client: str) -> tuple[list[Sample], list[Sample]]:
        k = self.clients().index(client)
        domains = self._class_domains()
        chosen = {c: ds[k] for c, ds in domains.items() if len(ds) > k}
        lacking = sorted(set(domains) - set(chosen))
        if lacking:
            logger.warning("NICO++ unique: %d class(es) have no domain #%d, %s gets none of: %s",
                           len(lacking), k, client, ", ".join(lacking))
        train, test = ([e.sample() for e in entries if chosen.get(e.class_name) == e.group]
                       for entries in (self._train, self._entries("test")))
        return train, test

    @cached_property
    def _train(self) -> list[ListEntry]:
        return self._entries("train")

    def _class_domains(self) -> dict[str, list[str]]:
        """Each class's domains, sorted: the k-th one is client k's."""
        domains: dict[str, set[str]] = {}
        for entry in self._train:
            domains.setdefault(entry.class_name, set()).add(entry.group)
        return {c: sorted(ds) for c, ds in domains.items()}

    def _entries(self, split: str) -> list[ListEntry]:
        folder = self.options.split_dir or self.options.root / "txtlist" / "NICO_unique_official"
        files = sorted(folder.glob(f"*_{split}.txt")) if folder.is_dir() else []
        if not files:
            raise BenchmarkError(f"no NICO++ unique split files *_{split}.txt in {folder}; put the official "
                                 "<class>_<domain>_train.txt / _test.txt lists there or pass split-dir")
        images = self.options.root / "NICO_unique"
        return [entry for path in files for entry in read_list_file(path, images, "class/group")]
