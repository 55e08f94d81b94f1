"""One logging setup for the server app, the client app and the demo, and progress that suits where it goes.

In a terminal, long work shows a tqdm bar. Written to a log file (Flower's app processes, ``flwr run
--stream``, docker logs), a bar's every refresh becomes a line of its own, so there :func:`progress`
logs a summary line at most every ``OSCAR_PROGRESS_SECONDS`` (default 30) and one when the work ends.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
T = TypeVar("T")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    # Flower's HTTP transport logs every request at INFO (several per second): keep the run readable.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Flower's logger prints through a handler of its own: passing its records on to the root handler as
    # well would print every Flower line twice.
    logging.getLogger("flwr").propagate = False
    if not interactive():
        quiet_library_progress_bars()


def quiet_library_progress_bars() -> None:
    """Hugging Face libraries draw their own bars (loading weights, pipeline components): off a terminal
    each redraw would be a log line, so they are turned off there; the project's own progress still logs."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass


def interactive() -> bool:
    """Progress goes to a terminal (``OSCAR_PROGRESS=bar`` or ``=log`` forces either way)."""
    forced = os.environ.get("OSCAR_PROGRESS", "").lower()
    if forced in ("bar", "log"):
        return forced == "bar"
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "it",
             logger: logging.Logger | None = None, leave: bool = True) -> "LoggedProgress | tqdm":
    """A tqdm bar in a terminal, otherwise rate-limited log lines; both iterate, ``update()`` and close."""
    if interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LoggedProgress(iterable, total=total, desc=desc, unit=unit, logger=logger, leave=leave)


class LoggedProgress:
    """The part of tqdm's interface the project uses, reporting through ``logging`` instead of redrawing."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str,
                 unit: str = "it", logger: logging.Logger | None = None, leave: bool = True,
                 every_seconds: float | None = None) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc, self.unit = desc, unit
        self.n = 0
        self.postfix = ""
        self.log = logger or logging.getLogger("oscar.progress")
        self.every = every_seconds if every_seconds is not None else float(os.environ.get("OSCAR_PROGRESS_SECONDS", 30))
        self.started = self.last = time.monotonic()
        self.closed = False
        self.leave = leave  # False: a short inner loop whose end the caller reports itself

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LoggedProgress without an iterable: call update()"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LoggedProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.summary(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave:
                self.log.info("%s (done)", self.summary(time.monotonic()))

    def summary(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", about {(self.total - self.n) / rate:.0f}s left"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit} in {elapsed:.1f}s ({rate:.2f} {self.unit}/s{eta}{extra})"


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
