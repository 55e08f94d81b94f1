"""A stage's summary: the dataclass a stage returns, also kept as ``<run dir>/stages/<stage>-summary.json``
so that a multi-process launch can hand it back and the report can read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

SummaryT = TypeVar("SummaryT", bound="StageSummary")


@dataclass
class StageSummary:
    """Base of the stages' summaries: their fields are the JSON file's keys."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[SummaryT], record: dict[str, Any]) -> SummaryT:
        return cls(**record)
