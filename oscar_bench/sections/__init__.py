"""The benchmark's sections, in the order they run. Each is one ``run(ctx) -> dict`` that returns rows of
measured numbers (and notes); the CLI guards each one, so a failure is recorded and the others still run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from oscar_bench.context import Context
from oscar_bench.report import Column, RatioSpec
from oscar_bench.sections import client_captioning, fidelity, inversion, peak, server_estimate, synthesis, training


@dataclass(frozen=True)
class Section:
    run: Callable[[Context], dict[str, Any]]
    columns: Sequence[Column] = ()
    ratios: Sequence[RatioSpec] = ()
    # Seconds the section is expected to take at each scale: the earlier sections leave this much for it.
    expected_seconds: dict[str, float] = field(default_factory=dict)


SECTIONS: dict[str, Section] = {
    "peak": Section(peak.run, peak.COLUMNS, expected_seconds={"full": 10}),
    # full: ~60-90 s of it is torch.compile of the UNet and VAE decoder (measured on one H200)
    "synthesis": Section(synthesis.run, synthesis.COLUMNS, synthesis.RATIOS, {"full": 240, "smoke": 60}),
    "training": Section(training.run, training.COLUMNS, training.RATIOS, {"full": 60}),
    "inversion": Section(inversion.run, inversion.COLUMNS, inversion.RATIOS, {"full": 30}),
    "fidelity": Section(fidelity.run, fidelity.COLUMNS, expected_seconds={"full": 20}),  # 2,048 + 256 images
    "client": Section(client_captioning.run, expected_seconds={"full": 120}),  # up to 2,048 images, 5 passes
    "server-estimate": Section(server_estimate.run, server_estimate.COLUMNS),
}
