"""What every section gets: the device, how much work to do, the run config, the clock, the results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from oscar_bench.report import Document
from oscar_bench.timing import Budget
from oscar_bench.workload import Scale
from oscar_common.config import OscarConfig


@dataclass
class Context:
    device: torch.device
    scale: Scale
    config: OscarConfig  # the run config's defaults, as a user's run starts
    budget: Budget
    doc: Document  # results so far (later sections read earlier ones)
    work_dir: Path  # scratch space for PNGs, removed after the run
    reserved_seconds: float = 0.0  # what the sections after the current one are expected to need

    @property
    def tiny(self) -> bool:
        return self.scale.mode == "tiny"

    @property
    def full_size(self) -> bool:
        return self.scale.mode != "tiny"

    def time_left(self) -> float:
        """Seconds the current section may spend on optional work without starving the later ones."""
        return self.budget.remaining() - self.reserved_seconds
