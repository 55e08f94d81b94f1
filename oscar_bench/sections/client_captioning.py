"""The client's captioning, benched by ``oscar_bench.client`` (BLIP-base: the project's path against a bare
``generate``)."""

from __future__ import annotations

from typing import Any

from oscar_bench.client import bench_client
from oscar_bench.context import Context


def run(ctx: Context) -> dict[str, Any]:
    budget = max(10.0, ctx.time_left())
    result = bench_client(tiny=ctx.tiny, device=ctx.device, images=ctx.scale.client_images, budget_seconds=budget)
    # The headline figures as a row too, so that the targets table can read them.
    row = {"key": "captioning", "images": result["images"], "batch_size": result["batch_size"],
           "pipeline_img_per_s": result["pipeline_img_per_s"], "bare_img_per_s": result["bare_generate_img_per_s"],
           "pipeline_vs_bare": result["pipeline_vs_bare"], "steady_vs_bare": result["pipeline_steady_vs_bare"]}
    return {"result": result, "rows": [row],
            "notes": [f"oscar_bench.client.bench_client(images={ctx.scale.client_images}, budget_seconds={budget:.0f})"]}
