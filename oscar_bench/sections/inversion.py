"""Prompt inversion: the project's PEZ on 540 random unit targets with CLIP ViT-B/32's text tower, as the
synthesis stage runs it (``oscar_server.stages.prompts.invert_targets``): in chunks (``inversion-chunk-size``, 0:
sized from free memory) and with the stage's CUDA settings (TF32 matmuls).

A run of ``steps`` optimisation steps that checks the current prompts ``evals`` times costs about
``setup + steps * step + evals * check`` seconds. Three short runs measure the three terms: ``steps``
steps checked twice (first and last step), the same checked every step, and twice the steps checked
twice. From them the section projects the run's setting (1000 steps, a check every 50) and the reference
PEZ code's (3000 steps, a check every step), so the defaults can be chosen with numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from oscar_bench.architectures import build_clip_text_tower
from oscar_bench.context import Context
from oscar_bench.project import stage_cuda_settings
from oscar_bench.report import Column, RatioSpec
from oscar_bench.timing import timed
from oscar_common.devices import free_device_memory, peak_memory_gb, reset_peak_memory
from oscar_server.stages.prompts import inversion_chunk, invert_targets

COLUMNS = (Column("run", "name"), Column("targets", "targets"), Column("steps", "steps"),
           Column("check every", "eval_every"), Column("checks", "evals"), Column("seconds", "seconds"),
           Column("s/step", "seconds_per_step", 4), Column("projected", "projected"))

RATIOS = (
    RatioSpec("reference (3000 steps, check every step) / ours (seconds)", "inversion.reference.seconds",
              "inversion.ours.seconds"),
    RatioSpec("per step: check every step / check every 50", "inversion.reference.seconds_per_step",
              "inversion.ours.seconds_per_step"),
)

OURS_EVAL_EVERY = 50  # invert_embeddings' default at 1000 steps (steps // 20)
REFERENCE_STEPS, REFERENCE_EVAL_EVERY = 3000, 1  # the PEZ reference code's defaults


def checks(steps: int, eval_every: int) -> int:
    """How many times ``invert_embeddings`` decodes and re-encodes the prompts: every ``eval_every``-th
    step from step 0, and the last step."""
    return len({s for s in range(0, steps, eval_every)} | {steps - 1})


def run(ctx: Context) -> dict[str, Any]:
    tokenizer, text_model = build_clip_text_tower(ctx.device, tiny=ctx.tiny)
    n, steps = ctx.scale.inversion_targets, ctx.scale.inversion_steps
    if steps < 3:
        raise ValueError(f"inversion_steps must be >= 3 to separate the check cost, got {steps}")
    targets = torch.nn.functional.normalize(
        torch.randn(n, text_model.config.projection_dim, generator=torch.Generator().manual_seed(0)), dim=-1)

    config = ctx.config
    with stage_cuda_settings(config):
        chunk = inversion_chunk(n, text_model, config)
        # One step first: one-time costs (vocabulary tables, kernel selection) stay out of the measured runs.
        invert_targets(targets, tokenizer, text_model, config.replace(inversion_steps=1), eval_every=1)
        reset_peak_memory(ctx.device)
        rows = []
        for key, run_steps, every in (("sparse", steps, steps), ("dense", steps, 1),
                                      ("sparse_long", 2 * steps, 2 * steps)):
            prompts, seconds = timed(lambda: invert_targets(targets, tokenizer, text_model,
                                                            config.replace(inversion_steps=run_steps),
                                                            eval_every=every), ctx.device)
            rows.append({"key": key, "name": f"measured: {run_steps} steps, check every {every}", "targets": n,
                         "steps": run_steps, "eval_every": every, "evals": checks(run_steps, every),
                         "seconds": seconds, "seconds_per_step": seconds / run_steps, "projected": False,
                         "mean_cosine": sum(p.cosine for p in prompts) / len(prompts)})
    memory = peak_memory_gb(ctx.device)
    model = cost_model(*rows)

    ours_steps = config.inversion_steps
    for key, label, total, every in (("ours", "the run's setting", ours_steps, OURS_EVAL_EVERY),
                                     ("reference", "reference PEZ", REFERENCE_STEPS, REFERENCE_EVAL_EVERY)):
        evals = checks(total, every)
        seconds = model["setup_seconds"] + total * model["step_seconds"] + evals * model["eval_seconds"]
        rows.append({"key": key, "name": f"projected, {label}: {total} steps, check every {every}", "targets": n,
                     "steps": total, "eval_every": every, "evals": evals, "seconds": seconds,
                     "seconds_per_step": seconds / total, "projected": True, "peak_memory_gb": memory})
    del text_model
    free_device_memory(ctx.device)
    return {"rows": rows, "model": model,
            "chunk_size": chunk,
            "notes": [f"{n} unit targets, {config.inversion_tokens} tokens, CLIP ViT-B/32 text tower, float32, in "
                      f"chunks of {chunk} (inversion-chunk-size {config.inversion_chunk_size or 'auto: free memory'})",
                      "cost per step {step_seconds:.4g} s, per check {eval_seconds:.4g} s, setup {setup_seconds:.3g} s"
                      .format(**model),
                      f"peak GPU memory {memory:.2f} GB" if memory is not None else "peak memory: not tracked off CUDA"]}


def cost_model(sparse: dict[str, Any], dense: dict[str, Any], sparse_long: dict[str, Any]) -> dict[str, float]:
    """setup, per-step and per-check seconds from the three measured runs (negative noise clamped to 0)."""
    eval_seconds = max(0.0, (dense["seconds"] - sparse["seconds"]) / (dense["evals"] - sparse["evals"]))
    step_seconds = max(0.0, (sparse_long["seconds"] - sparse["seconds"]) / (sparse_long["steps"] - sparse["steps"]))
    setup_seconds = max(0.0, sparse["seconds"] - sparse["steps"] * step_seconds - sparse["evals"] * eval_seconds)
    return {"step_seconds": step_seconds, "eval_seconds": eval_seconds, "setup_seconds": setup_seconds}
