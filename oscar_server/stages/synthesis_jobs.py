"""What the synthesis stage generates: one :class:`SynthesisJob` per synthetic image, in a fixed order.

The uploads give, per client, one or more rows of conditioning per class (a mean embedding; with
"k prototypes per class" a class has k rows). Every (client, class) pair gets ``images-per-class``
images; image ``i`` is conditioned on the class's row ``i mod k``, so the images are spread evenly over
the prototypes, and with one row per class nothing changes.

Everything is ordered by (client name, class id, index), whatever order the uploads arrived in, and each
image has a seed that depends only on (run seed, client, class id, index): the set is the same whichever
process, batch or restart generates which image.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from oscar_common.files import safe_filename
from oscar_common.upload_rules import Upload


def image_seed(base_seed: int, client: str, class_id: int, index: int) -> int:
    """A 63-bit seed that depends only on these fields (not on job order, batch or restart)."""
    digest = hashlib.sha256(f"oscar-image/{base_seed}/{client}/{class_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def prompt_class_name(class_name: str) -> str:
    """The class name as words for a prompt: dataset folder names such as ``aircraft_carrier`` use
    underscores for spaces (files and folders keep the folder name)."""
    return " ".join(class_name.replace("_", " ").split())


@dataclass(frozen=True)
class UploadRow:
    """One row of conditioning in a client's upload: the ``prototype``-th mean of class ``class_id``."""

    client: str
    class_id: int
    prototype: int
    row: int  # index into the upload's ``means``


def upload_rows(payloads: Iterable[Upload]) -> list[UploadRow]:
    """Every conditioning row of the uploads, ordered by (client name, class id, prototype)."""
    rows = []
    for payload in sorted(payloads, key=lambda p: p.client_name):
        class_ids = [int(c) for c in payload.class_ids]
        seen: dict[int, int] = {}
        # Stable sort: a class's rows keep their order in the upload, which numbers the prototypes.
        for row in sorted(range(len(class_ids)), key=lambda r: class_ids[r]):
            class_id = class_ids[row]
            rows.append(UploadRow(payload.client_name, class_id, seen.get(class_id, 0), row))
            seen[class_id] = seen.get(class_id, 0) + 1
    return rows


def row_means(rows: list[UploadRow], payloads: Iterable[Upload]) -> torch.Tensor:
    """The uploaded means of ``rows``, stacked in that order, float32 (they may travel as float16)."""
    means = {p.client_name: torch.from_numpy(p.means).float() for p in payloads}
    return torch.stack([means[row.client][row.row] for row in rows])


@dataclass
class SynthesisJob:
    client: str
    class_id: int
    class_name: str
    index: int
    seed: int
    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = field(default=None, repr=False)  # [77, H] for one image
    prototype: int = 0  # which of the class's upload rows conditions this image

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("a SynthesisJob needs exactly one of prompt and prompt_embeds")

    @property
    def relative_path(self) -> Path:
        name = f"{safe_filename(self.client)}__c{self.class_id:04d}__{self.index:03d}.png"
        return Path(safe_filename(self.class_name)) / name


@dataclass(frozen=True)
class SyntheticImage:
    """A finished image of the synthetic set, as found on disk (for training and reports)."""

    path: Path
    client: str  # as in the file name (made file-name safe)
    class_id: int
    index: int


_IMAGE_NAME = re.compile(r"^(?P<client>.+)__c(?P<class_id>\d+)__(?P<index>\d+)\.png$")


def synthetic_images(synthetic_dir: Path) -> list[SyntheticImage]:
    """The images under ``synthetic_dir`` named as :attr:`SynthesisJob.relative_path` names them, sorted by
    (client, class id, index); temporary files of unfinished writes and other files are left out."""
    found = []
    for path in Path(synthetic_dir).glob("*/*.png"):
        match = _IMAGE_NAME.match(path.name)
        if match:
            found.append(SyntheticImage(path, match["client"], int(match["class_id"]), int(match["index"])))
    return sorted(found, key=lambda image: (image.client, image.class_id, image.index))


def plan_jobs(
    rows: list[UploadRow],
    conditioning: list[str] | torch.Tensor,
    *,
    class_names: tuple[str, ...],
    images_per_class: int,
    base_seed: int,
) -> list[SynthesisJob]:
    """``images_per_class`` jobs for every (client, class) of ``rows`` (as :func:`upload_rows` orders them).

    ``conditioning`` is aligned with ``rows``: prompts (``pooled``; the template already applied) or a
    ``[len(rows), 77, H]`` tensor of per-token embeddings (``tokens``).
    """
    if len(conditioning) != len(rows):
        raise ValueError(f"{len(conditioning)} prompts/embeddings for {len(rows)} upload rows")
    by_class: dict[tuple[str, int], list[int]] = {}
    for position, row in enumerate(rows):
        by_class.setdefault((row.client, row.class_id), []).append(position)
    jobs = []
    for (client, class_id), positions in sorted(by_class.items()):
        for index in range(images_per_class):
            position = positions[index % len(positions)]
            value = conditioning[position]
            kind = {"prompt": value} if isinstance(value, str) else {"prompt_embeds": value}
            jobs.append(SynthesisJob(client, class_id, class_names[class_id], index,
                                     image_seed(base_seed, client, class_id, index),
                                     prototype=rows[position].prototype, **kind))
    return jobs
