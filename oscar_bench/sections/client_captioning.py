"""The client's captioning, benched by ``oscar_bench.client`` (BLIP-base: the project's path against a bare
``generate``), which is written with the client's work. Until it exists this section says so."""

from __future__ import annotations

import importlib
from typing import Any

from oscar_bench.context import Context

CLIENT_MODULE = "oscar_bench.client"


def run(ctx: Context) -> dict[str, Any]:
    try:
        module = importlib.import_module(CLIENT_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != CLIENT_MODULE:
            raise  # the module is there but something it needs is not: a failure, not an absence
        return {"status": "not available", "reason": f"{CLIENT_MODULE} is not there yet"}
    budget = max(10.0, ctx.time_left())
    result = module.bench_client(tiny=ctx.tiny, device=ctx.device, images=ctx.scale.client_images,
                                 budget_seconds=budget)
    return {"result": result, "notes": [f"{CLIENT_MODULE}.bench_client(images={ctx.scale.client_images}, "
                                        f"budget_seconds={budget:.0f})"]}
