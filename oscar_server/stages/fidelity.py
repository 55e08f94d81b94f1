"""The synthesis fidelity: how well each synthetic image matches what its client uploaded, without client data.

With the ``pooled`` scheme a client's upload is, per class, a mean of L2-normalised CLIP text embeddings:
a point of CLIP's joint image-text space. The server embeds each synthetic image with the vision tower of
the same CLIP and compares (all on unit vectors, so a dot product is a cosine):

* ``cosine``: the image against its own (client, class) mean, normalised (with k prototypes per class,
  the mean of the class's rows);
* ``rank``: where its own class comes among its own client's class means, nearest first; ``top1`` is
  ``rank == 1`` (the image would be retrieved as its class from that client's upload);
* ``domain_retained``: whether the image is nearer to its own client's mean of the class than to every
  other client's mean of the same class (None where no other client uploaded the class). Clients of
  different domains (DomainNet) caption the same class differently: an image that keeps its client's
  domain is nearer to that client's mean.

Text and image embeddings of CLIP sit in different regions of the joint space (the "modality gap"):
cosines between an image and a text are small (about 0.2-0.35 for a matching pair with real
CLIP ViT-B/32), so compare them between images, classes and clients, not with 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Owner = tuple[str, int]  # (client, class id)


def class_means(owners: Sequence[Owner], means: torch.Tensor) -> dict[Owner, torch.Tensor]:
    """One unit vector per (client, class): the mean of ``means``' rows that ``owners`` (aligned) give it."""
    grouped: dict[Owner, list[int]] = {}
    for position, owner in enumerate(owners):
        grouped.setdefault(owner, []).append(position)
    return {owner: F.normalize(means[positions].float().mean(dim=0), dim=-1) for owner, positions in grouped.items()}


@dataclass(frozen=True)
class ImageScore:
    cosine: float
    rank: int  # 1: its own class is the nearest of its client's class means
    domain_retained: bool | None  # None: no other client uploaded this class

    @property
    def top1(self) -> bool:
        return self.rank == 1


def score_images(image_embeds: torch.Tensor, owners: Sequence[Owner],
                 means: dict[Owner, torch.Tensor]) -> list[ImageScore]:
    """The figures of each image (``image_embeds`` [N, D], any norm) against the (client, class) ``means``
    (:func:`class_means`); ``owners[i]`` is the (client, class) image ``i`` was made for."""
    images = F.normalize(image_embeds.float(), dim=-1)
    keys = sorted(means)
    table = torch.stack([means[key] for key in keys]).to(images.device)
    cosines = images @ table.T  # [N, all (client, class) means]
    column = {key: i for i, key in enumerate(keys)}
    # The columns of each client and of each class, listed once: per image a scan of every key would make the
    # scoring quadratic in the (client, class) pairs (10,000 at 1,000 clients).
    client_columns: dict[str, list[int]] = {}
    class_columns: dict[int, list[tuple[str, int]]] = {}
    for i, (client, class_id) in enumerate(keys):
        client_columns.setdefault(client, []).append(i)
        class_columns.setdefault(class_id, []).append((client, i))
    same_client = {client: torch.tensor(columns, device=table.device) for client, columns in client_columns.items()}
    scores = []
    for i, (client, class_id) in enumerate(owners):
        row = cosines[i]
        own = row[column[(client, class_id)]]
        rank = 1 + int((row[same_client[client]] > own).sum())
        others = [j for other, j in class_columns[class_id] if other != client]
        retained = bool((own > row[others]).all()) if others else None
        scores.append(ImageScore(float(own), rank, retained))
    return scores


@dataclass
class FidelityRow:
    """One synthetic image in ``fidelity.json``."""

    client: str
    class_id: int
    class_name: str
    index: int
    path: str  # relative to the run directory, where the image is now
    cosine: float
    rank: int
    top1: bool
    domain_retained: bool | None
    kept: bool  # in the training set
    stamp: str  # the file's size and modification time when measured: a changed file is measured again


@dataclass
class FidelityFigures:
    """The figures of a group of images (a client, a (client, class), the run); fractions in [0, 1]."""

    images: int
    mean_cosine: float | None
    top1: float | None  # fraction of images whose own class is the nearest of their client's
    domain_retention: float | None  # fraction of the images that have a comparison (classes of >= 2 clients)
    domain_images: int  # how many had one

    @classmethod
    def of(cls, rows: Sequence[FidelityRow]) -> "FidelityFigures":
        domain = [r.domain_retained for r in rows if r.domain_retained is not None]
        return cls(images=len(rows), mean_cosine=_mean([r.cosine for r in rows]), top1=_mean([r.top1 for r in rows]),
                   domain_retention=_mean(domain), domain_images=len(domain))


@dataclass
class ClientFidelity(FidelityFigures):
    client: str = ""


@dataclass
class ClassFidelity(FidelityFigures):
    client: str = ""
    class_id: int = 0
    class_name: str = ""


@dataclass
class FidelitySummary:
    """The run's fidelity, over the images kept for training (``generated`` counts every measured one)."""

    measured: bool
    note: str  # what was measured, or why nothing was
    encoder: str | None = None
    generated: int = 0
    kept: int = 0
    overall: FidelityFigures | None = None
    overall_generated: FidelityFigures | None = None  # every generated image, filtered out ones included
    clients: list[ClientFidelity] = field(default_factory=list)
    classes: list[ClassFidelity] = field(default_factory=list)  # every (client, class)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "FidelitySummary":
        record = dict(record)
        for key in ("overall", "overall_generated"):
            record[key] = None if record.get(key) is None else FidelityFigures(**record[key])
        record["clients"] = [ClientFidelity(**c) for c in record.get("clients", [])]
        record["classes"] = [ClassFidelity(**c) for c in record.get("classes", [])]
        return cls(**record)

    def lowest_classes(self, count: int) -> list[ClassFidelity]:
        """The (client, class) pairs with the lowest mean cosine."""
        return sorted((c for c in self.classes if c.mean_cosine is not None), key=lambda c: c.mean_cosine)[:count]


def summarise(rows: Sequence[FidelityRow], *, note: str, encoder: str, seconds: float) -> FidelitySummary:
    kept = [r for r in rows if r.kept]
    by_client: dict[str, list[FidelityRow]] = {}
    by_class: dict[Owner, list[FidelityRow]] = {}
    for row in kept:
        by_client.setdefault(row.client, []).append(row)
        by_class.setdefault((row.client, row.class_id), []).append(row)
    return FidelitySummary(
        measured=True, note=note, encoder=encoder, generated=len(rows), kept=len(kept),
        overall=FidelityFigures.of(kept), overall_generated=FidelityFigures.of(rows),
        clients=[ClientFidelity(**asdict(FidelityFigures.of(group)), client=client)
                 for client, group in sorted(by_client.items())],
        classes=[ClassFidelity(**asdict(FidelityFigures.of(group)), client=client, class_id=class_id,
                               class_name=group[0].class_name)
                 for (client, class_id), group in sorted(by_class.items())],
        seconds=round(seconds, 2))


def ranked_for_keeping(rows: Iterable[FidelityRow]) -> list[FidelityRow]:
    """Highest cosine first; equal cosines by index, so the choice never depends on the order measured."""
    return sorted(rows, key=lambda r: (-r.cosine, r.index))


def _mean(values: Sequence[float | bool]) -> float | None:
    return round(sum(float(v) for v in values) / len(values), 4) if values else None
