"""The device's own ceiling: a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s).

Every "% of peak" in the benchmark divides by the matmul rate measured here, in the same run.
"""

from __future__ import annotations

from typing import Any

import torch

from oscar_bench.context import Context
from oscar_bench.report import Column
from oscar_bench.timing import repeated_seconds

COLUMNS = (Column("what", "name"), Column("dtype", "dtype"), Column("iterations", "iterations"),
           Column("seconds", "seconds", 4), Column("TFLOP/s", "tflops"), Column("GB/s", "gb_per_s"))

WARMUP, ITERATIONS = 3, 10


def run(ctx: Context) -> dict[str, Any]:
    cuda = ctx.device.type == "cuda"
    # On a GPU: bf16 8192^3 (large enough to saturate the tensor cores). On a CPU: something quick.
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    seconds = repeated_seconds(lambda: a @ b, ctx.device, warmup=WARMUP, iterations=ITERATIONS)
    flops = 2 * n**3 * ITERATIONS
    matmul = {"key": "matmul", "name": f"matmul {n}^3", "dtype": str(dtype).removeprefix("torch."),
              "iterations": ITERATIONS, "flops": flops, "seconds": seconds, "tflops": flops / seconds / 1e12}
    del a, b

    nbytes = (1 << 30) if cuda else (32 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device).random_()
    dst = torch.empty_like(src)
    seconds = repeated_seconds(lambda: dst.copy_(src), ctx.device, warmup=WARMUP, iterations=ITERATIONS)
    moved = 2 * nbytes * ITERATIONS  # each copy reads and writes every byte
    copy = {"key": "copy", "name": f"copy {nbytes / 1e9:.2f} GB", "dtype": "uint8", "iterations": ITERATIONS,
            "bytes_moved": moved, "seconds": seconds, "gb_per_s": moved / seconds / 1e9}
    return {"rows": [matmul, copy],
            "notes": [f"mean of {ITERATIONS} after {WARMUP} warm-ups on random data"
                      + ("; CUDA events" if cuda else "; on a CPU: a small float32 matmul, not a peak rate"),
                      "GB/s counts bytes read and written"]}
