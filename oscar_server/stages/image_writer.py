"""PNG encoding and atomic writes beside the GPU: a bounded pool of writer threads.

Encoding a 512x512 PNG takes ~47 ms on one core, as long as a GPU needs for ~0.2 images: done in the
generating thread it would stall the GPU. PIL releases the GIL while it compresses and the file system
while it writes, so a few threads keep up with the GPU. At most ``max_pending_batches`` batches wait in
the pool; beyond that :meth:`PngWriter.submit` blocks, so memory stays bounded when the disk is slow.

Every image is written atomically (temporary file, fsync, rename) and an existing file is never
rewritten: a restarted stage takes any PNG under its final name for a finished image.
"""

from __future__ import annotations

import io
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from oscar_common.files import atomic_write_bytes


def write_png(path: Path, pixels: np.ndarray) -> bool:
    """Write ``pixels`` (uint8 [H, W, 3]) as a PNG at ``path``; False if the file already exists."""
    if path.exists():
        return False
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return True


class PngWriter:
    """``submit`` a batch of (path, pixels); ``close`` (or leaving the ``with`` block) waits for all.

    ``workers`` 0 writes in the calling thread. The first error of any write is raised by the next
    ``submit`` or by ``close``.
    """

    def __init__(self, workers: int, max_pending_batches: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png") if workers > 0 else None
        self._pending: deque[list[Future]] = deque()
        self._max_pending = max(1, max_pending_batches)
        self.written: list[Path] = []

    def submit(self, batch: list[tuple[Path, np.ndarray]]) -> None:
        if self._pool is None:
            self.written += [path for path, pixels in batch if write_png(path, pixels)]
            return
        self._pending.append([self._pool.submit(self._write, path, pixels) for path, pixels in batch])
        while len(self._pending) > self._max_pending:
            self._collect(self._pending.popleft())

    def close(self) -> None:
        while self._pending:
            self._collect(self._pending.popleft())
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _write(self, path: Path, pixels: np.ndarray) -> Path | None:
        return path if write_png(path, pixels) else None

    def _collect(self, futures: list[Future]) -> None:
        self.written += [path for path in (f.result() for f in futures) if path is not None]

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: drop what has not started, let running writes finish (they are atomic).
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
