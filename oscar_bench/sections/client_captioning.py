"""The client's captioning, benched by ``oscar_bench.client`` (BLIP-base: the project's path against a bare
``generate``)."""

from __future__ import annotations

from typing import Any

from oscar_bench.client import bench_client
from oscar_bench.context import Context


def run(ctx: Context) -> dict[str, Any]:
    budget = max(10.0, ctx.time_left())
    result = bench_client(tiny=ctx.tiny, device=ctx.device, images=ctx.scale.client_images, budget_seconds=budget)
    return {"result": result, "notes": [f"oscar_bench.client.bench_client(images={ctx.scale.client_images}, "
                                        f"budget_seconds={budget:.0f})"]}
