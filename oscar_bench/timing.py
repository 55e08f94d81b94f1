"""Wall-clock measurement that waits for the device, and the run's time budget."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(``fn()``, seconds), with the device idle before and finished after: end-to-end time."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def repeated_seconds(fn: Callable[[], Any], device: torch.device, *, warmup: int, iterations: int) -> float:
    """Total seconds of ``iterations`` calls of a kernel-sized ``fn`` after ``warmup`` untimed ones
    (CUDA events on a GPU, so host overhead between launches is not counted)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    _, seconds = timed(lambda: [fn() for _ in range(iterations)], device)
    return seconds


class Budget:
    """A deadline for the whole run; sections size their optional work by what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()
