"""DomainNet, one domain per client, read through the official split files.

Layout (the official download, unpacked into one folder)::

    <root>/<domain>/<class>/<file>.jpg          e.g. clipart/aircraft_carrier/clipart_001_000018.jpg
    <root>/<domain>_train.txt, <domain>_test.txt   lines '<domain>/<class>/<file>.jpg <label>'

The split files may also sit in ``<root>/splits/`` (FedCADO's layout) or in ``split-dir``. Labels are
the official ones (0-344); class names are the folder names.
"""

from __future__ import annotations

from pathlib import Path

from oscar_common.data.datasets.common import Benchmark, BenchmarkError, ListEntry, find_split_file, read_list_file
from oscar_common.data.local import Sample

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

# The 90 classes of the official OSCAR code: labels 0-29, 40-89 and 220-229. The code relabels
# 220-229 as 30-39, so in its class-id order they come right after 0-29.
OSCAR90 = (*range(0, 30), *range(220, 230), *range(40, 90))
# FedCADO (and FedDISC): the first 90 labels.
FEDCADO90 = tuple(range(90))


class DomainNet(Benchmark):
    subsets = {"oscar90": OSCAR90, "fedcado90": FEDCADO90}

    def clients(self) -> list[str]:
        return list(DOMAINS)

    def labelled_classes(self) -> dict[int, str]:
        labelled: dict[int, str] = {}
        found = [domain for domain in DOMAINS if self._has_list(domain, "train")]
        if not found:
            self._split_file(DOMAINS[0], "train")  # raises, naming the file and the folders searched
        for domain in found:
            for entry in self._entries(domain, "train"):
                if labelled.setdefault(entry.label, entry.class_name) != entry.class_name:
                    raise BenchmarkError(f"DomainNet label {entry.label} names both {labelled[entry.label]!r} "
                                         f"and {entry.class_name!r} ({domain}_train.txt)")
        return labelled

    def client_samples(self, client: str) -> tuple[list[Sample], list[Sample]]:
        return ([e.sample() for e in self._entries(client, "train")],
                [e.sample() for e in self._entries(client, "test")])

    def _folders(self) -> list[Path]:
        root = self.options.root
        return [self.options.split_dir] if self.options.split_dir else [root, root / "splits"]

    def _has_list(self, domain: str, split: str) -> bool:
        return any((folder / f"{domain}_{split}.txt").is_file() for folder in self._folders())

    def _split_file(self, domain: str, split: str) -> Path:
        return find_split_file(f"{domain}_{split}.txt", self._folders(),
                               "put the official <domain>_train.txt / <domain>_test.txt there or pass split-dir")

    def _entries(self, domain: str, split: str) -> list[ListEntry]:
        return read_list_file(self._split_file(domain, split), self.options.root, "group/class", group=domain)
