"""Synthesis: the official code's way of generating against the project's, in the same process.

(a) The official-style loop imitates the official OSCAR code (``model/stable_diffusion/generation.py`` and
    ``ptp_utils.py``): float32, one image per call, a hand-written loop over the PNDM scheduler's last
    ``steps`` timesteps, classifier-free guidance on the concatenated [empty prompt; condition] context with
    g = 7.5, decode ``latents / 0.18215``, one PNG per image.
(b) The project's path as a user's run executes it, at the run config's defaults, through the synthesis
    stage's own functions (``prepare_generation``, ``generate_jobs``; oscar_bench.project):
    bf16/fp16 on CUDA, the batch size from free memory, fused QKV, ``torch.compile`` of the UNet and VAE
    decoder on CUDA (its warm-up call's seconds are the "compile s"), the PNG writer pool, every image
    written. One warm-up batch follows the compilation (its seconds are the "warm-up s"); the timed
    batches come after it.
(c) The bare diffusers pipeline call on the same (fused, compiled) pipeline, tensors out, no PNGs: what the
    PNG path costs on top.

FLOPs per image are counted with ``FlopCounterMode`` on one real UNet call (the CFG pair), one VAE
decode and the text encoding, then scaled by the number of UNet calls each path makes.
"""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import PNDMScheduler
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from oscar_bench.architectures import DiffusionParts, build_diffusion
from oscar_bench.context import Context
from oscar_bench.project import project_generate, project_pipeline, stage_cuda_settings
from oscar_bench.report import Column, RatioSpec
from oscar_bench.timing import timed
from oscar_common.config import OscarConfig
from oscar_common.devices import free_device_memory
from oscar_server.stages.generation import PreparedPipeline, generation_dtype, prepare_generation

log = logging.getLogger(__name__)

COLUMNS = (Column("path", "name"), Column("dtype", "dtype"), Column("batch", "batch_size"),
           Column("images", "images"), Column("seconds", "seconds"), Column("img/s", "img_per_s"),
           Column("UNet calls/img", "unet_calls"), Column("TFLOP/img", "tflop_per_image"),
           Column("TFLOP/s", "tflops"), Column("% of peak", "pct_of_peak"),
           Column("warm-up s", "warmup_seconds"), Column("compile s", "compile_seconds"))

RATIOS = (
    RatioSpec("project / official-style (img/s)", "synthesis.project.img_per_s", "synthesis.official.img_per_s"),
    RatioSpec("bare pipeline / official-style (img/s)", "synthesis.bare.img_per_s", "synthesis.official.img_per_s"),
    RatioSpec("project / bare pipeline (img/s)", "synthesis.project.img_per_s", "synthesis.bare.img_per_s"),
    RatioSpec("project TFLOP/s / measured peak", "synthesis.project.tflops", "peak.matmul.tflops"),
)

VAE_SCALING = 0.18215  # SD 1.x; the official code divides by this literal


def run(ctx: Context) -> dict[str, Any]:
    scale = ctx.scale
    (parts, build_seconds) = timed(lambda: build_diffusion(ctx.device, tiny=ctx.tiny), ctx.device)
    # The run config at the benchmark's scale: fewer steps, a smaller image or a fixed batch off full scale.
    config = ctx.config.replace(num_inference_steps=scale.steps or ctx.config.num_inference_steps,
                                image_resolution=scale.resolution, generation_batch_size=scale.batch_size)
    resolution = config.image_resolution or parts.native_resolution
    steps, guidance = config.num_inference_steps, config.guidance_scale
    notes = [f"{resolution}x{resolution}, {steps} steps, guidance {guidance}; models built in {build_seconds:.1f} s"]

    flops = count_flops(parts, resolution=resolution, device=ctx.device)
    official = _official_row(ctx, parts, resolution=resolution, steps=steps, guidance=guidance, flops=flops)
    rows = [official]

    dtype = generation_dtype(config.dtype, ctx.device)
    # The project runs in its own dtype; the float32 parts stay as the official loop had them.
    project_parts = parts if dtype == torch.float32 else _converted(parts, dtype)
    with stage_cuda_settings(config):
        pipe = project_pipeline(project_parts, device=ctx.device, config=config)
        prepared, prepare_seconds = timed(lambda: prepare_generation(pipe, config, ctx.device), ctx.device)
        batch = prepared.batch_size
        pipe.scheduler.set_timesteps(steps)
        project_unet_calls = len(pipe.scheduler.timesteps)
        per_image = _per_image_tflop(flops, unet_calls=project_unet_calls, text_sequences=2)  # prompt + empty prompt
        prompts = _random_prompts(parts.tokenizer, (1 + scale.project_batches) * batch,
                                  tokens=config.inversion_tokens, template=config.prompt_template)

        warm_prompts, timed_prompts = prompts[:batch], prompts[batch:]
        _, warmup_seconds = timed(lambda: project_generate(pipe, prompts=warm_prompts, out_dir=ctx.work_dir / "warmup",
                                                           config=config, batch_size=batch), ctx.device)
        written, seconds = timed(lambda: project_generate(pipe, prompts=timed_prompts,
                                                          out_dir=ctx.work_dir / "project", config=config,
                                                          batch_size=batch, first_index=batch), ctx.device)
        if written != len(timed_prompts):
            raise RuntimeError(f"the project's synthesis wrote {written} of {len(timed_prompts)} images")
        rows.append(_rate_row(ctx, "project", "project: synthesis stage's path, PNGs written", dtype, batch, written,
                              seconds, project_unet_calls, per_image, warmup_seconds=warmup_seconds,
                              compile_seconds=prepared.compile_seconds))

        if scale.bare_pipeline and (ctx.tiny or ctx.time_left() > 3 * seconds / scale.project_batches):
            # Same pipeline object and settings, one batch, tensors out as the stage asks, no files.
            generators = [torch.Generator().manual_seed(i) for i in range(batch)]
            size = config.image_resolution or None
            _, bare_seconds = timed(lambda: pipe(prompt=list(warm_prompts), height=size, width=size,
                                                 num_inference_steps=steps, guidance_scale=guidance,
                                                 generator=generators, output_type="pt"), ctx.device)
            rows.append(_rate_row(ctx, "bare", "bare pipeline call, no PNGs", dtype, batch, batch, bare_seconds,
                                  project_unet_calls, per_image))
        elif scale.bare_pipeline:
            notes.append("bare pipeline skipped: time budget")

    chosen = "generation-batch-size" if config.generation_batch_size else "auto: free GPU memory, or fixed on a CPU"
    notes.append(f"project: batch {batch} ({chosen}), fused QKV {config.fuse_qkv}, {_compile_note(prepared, config)}, "
                 f"{config.png_writers} PNG writer threads; preparing took {prepare_seconds:.1f} s")
    notes.append("FLOPs: UNet CFG pair {unet_pair_tflop:.4g} TFLOP per call, VAE decode {vae_decode_tflop:.4g}, "
                 "text encoder {text_sequence_tflop:.3g} per sequence".format(**flops))
    del pipe, project_parts, parts
    free_device_memory(ctx.device)
    return {"rows": rows, "notes": notes, "flop_count": flops,
            "settings": {"resolution": resolution, "steps": steps, "guidance_scale": guidance,
                         "scheduler": config.scheduler, "project_dtype": str(dtype).removeprefix("torch."),
                         "batch_size": batch, "batch_size_auto": not config.generation_batch_size,
                         "fuse_qkv": config.fuse_qkv, "compile": config.compile, "compiled": prepared.compiled,
                         "compile_mode": config.compile_mode,
                         "compile_seconds": prepared.compile_seconds, "prepare_seconds": prepare_seconds,
                         "png_writers": config.png_writers, "tf32": config.tf32}}


# --------------------------------------------------------------------------------- the official loop
def _official_row(ctx: Context, parts: DiffusionParts, *, resolution: int, steps: int, guidance: float,
                  flops: dict[str, float]) -> dict[str, Any]:
    scheduler = PNDMScheduler.from_config(parts.scheduler.config)  # the checkpoint default, never replaced
    scheduler.set_timesteps(steps)
    unet_calls = len(scheduler.timesteps[-steps:])
    hidden = parts.text_encoder.config.hidden_size
    # The official condition is a per-token mean of caption states, [1, 77, hidden]: its values cost nothing.
    condition = torch.randn(1, parts.tokenizer.model_max_length, hidden, generator=torch.Generator().manual_seed(0))
    out_dir = ctx.work_dir / "official"
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(seed: int):
        return official_style_image(parts, scheduler, condition, seed=seed, steps=steps, guidance=guidance,
                                    resolution=resolution, path=out_dir / f"image{seed}.png")

    warmup_seconds = timed(lambda: one(10_000), ctx.device)[1] if ctx.scale.official_warmup else None
    images, seconds = 0, 0.0
    for seed in range(ctx.scale.official_images):
        if images and ctx.time_left() < 3 * seconds / images and not ctx.tiny:
            break
        _, s = timed(lambda: one(seed), ctx.device)
        images, seconds = images + 1, seconds + s
    per_image = _per_image_tflop(flops, unet_calls=unet_calls, text_sequences=1)  # the empty prompt only
    return _rate_row(ctx, "official", "official-style loop (1 image per call, PNG)", torch.float32, 1, images,
                     seconds, unet_calls, per_image, warmup_seconds=warmup_seconds)


@torch.no_grad()
def official_style_image(parts: DiffusionParts, scheduler: PNDMScheduler, condition: torch.Tensor, *, seed: int,
                         steps: int, guidance: float, resolution: int, path: Path) -> None:
    """One image the way the official code makes it (``ptp_utils.text2image_ldm_stable`` and friends)."""
    device = parts.unet.device
    uncond_ids = parts.tokenizer([""], padding="max_length", max_length=parts.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
    uncond = parts.text_encoder(uncond_ids.to(device))[0]
    context = torch.cat([uncond, condition.to(device, uncond.dtype)])
    size = resolution // _vae_scale(parts)
    latents = torch.randn((1, parts.unet.config.in_channels, size, size),
                          generator=torch.Generator().manual_seed(seed)).to(device)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps[-steps:]:
        noise_pred = parts.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents)["prev_sample"]
    image = parts.vae.decode(latents / VAE_SCALING)["sample"]
    image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    Image.fromarray((image[0] * 255).astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------------------- FLOPs
@torch.no_grad()
def count_flops(parts: DiffusionParts, *, resolution: int, device: torch.device) -> dict[str, float]:
    """FLOPs of one UNet call on a CFG pair, one VAE decode and one text-encoder sequence, in TFLOP.

    Attention runs on SDPA's math backend while counting: its matmuls are then visible to the counter
    on every device (the fused CPU kernel is not); the count is the same as a fused kernel's formula.
    """
    size = resolution // _vae_scale(parts)
    dtype = parts.unet.dtype
    latents = torch.randn(2, parts.unet.config.in_channels, size, size, device=device, dtype=dtype)
    length = parts.tokenizer.model_max_length
    context = torch.randn(2, length, parts.text_encoder.config.hidden_size, device=device, dtype=dtype)
    ids = torch.randint(0, len(parts.tokenizer), (1, length), device=device)
    t = torch.tensor(500, device=device)

    def measure(fn) -> float:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    return {"unet_pair_tflop": measure(lambda: parts.unet(latents, t, encoder_hidden_states=context)),
            "vae_decode_tflop": measure(lambda: parts.vae.decode(latents[:1] / VAE_SCALING)),
            "text_sequence_tflop": measure(lambda: parts.text_encoder(ids)),
            "resolution": resolution}


def _per_image_tflop(flops: dict[str, float], *, unet_calls: int, text_sequences: int) -> float:
    return (unet_calls * flops["unet_pair_tflop"] + flops["vae_decode_tflop"]
            + text_sequences * flops["text_sequence_tflop"])


# ----------------------------------------------------------------------------------------- helpers
def _rate_row(ctx: Context, key: str, name: str, dtype: torch.dtype, batch: int, images: int, seconds: float,
              unet_calls: int, tflop_per_image: float, **extra: Any) -> dict[str, Any]:
    img_per_s = images / seconds if seconds > 0 else None
    tflops = img_per_s * tflop_per_image if img_per_s else None
    try:
        peak = ctx.doc.value("peak.matmul.tflops")
    except KeyError:
        peak = None
    return {"key": key, "name": name, "dtype": str(dtype).removeprefix("torch."), "batch_size": batch,
            "images": images, "seconds": seconds, "img_per_s": img_per_s, "unet_calls": unet_calls,
            "tflop_per_image": tflop_per_image, "tflops": tflops,
            "pct_of_peak": 100 * tflops / peak if tflops and peak else None, **extra}


def _compile_note(prepared: PreparedPipeline, config: OscarConfig) -> str:
    if not prepared.compile_asked:
        return "not compiled (compile=auto: on CUDA only)" if config.compile == "auto" else "not compiled"
    if not prepared.compiled:
        return "torch.compile FAILED, eager pipeline timed (the log says why)"
    return f"torch.compile mode {config.compile_mode} in {prepared.compile_seconds:.1f} s"


def _vae_scale(parts: DiffusionParts) -> int:
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


def _converted(parts: DiffusionParts, dtype: torch.dtype) -> DiffusionParts:
    return DiffusionParts(copy.deepcopy(parts.unet).to(dtype), copy.deepcopy(parts.vae).to(dtype),
                          copy.deepcopy(parts.text_encoder).to(dtype), parts.tokenizer,
                          PNDMScheduler.from_config(parts.scheduler.config))


def _random_prompts(tokenizer, n: int, *, tokens: int, template: str) -> list[str]:
    """Prompts shaped like the pooled scheme's: class name + an inverted prompt of ``tokens`` real tokens."""
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [template.format(class_name=f"class {i}", prompt=tokenizer.decode(rng.sample(vocab, tokens)))
            for i in range(n)]
