"""Synthetic images from :class:`~oscar_server.stages.synthesis_jobs.SynthesisJob` s with diffusers' Stable Diffusion
pipeline, at the GPU's pace.

Guidance is diffusers' ``eps_u + g * (eps_c - eps_u)`` with the empty prompt as the unconditional input, as
in the paper (its ``s`` is ``g - 1``). Each image gets its own CPU generator seeded with ``job.seed``, so
an image does not depend on the batch or the process it falls in.

The synthesis stage and oscar-bench both ready a loaded pipeline with :func:`prepare_generation` and
generate with :func:`generate_jobs`, which take their settings from the run config.

What keeps the GPU busy (each a run-config switch, see :func:`prepare_pipeline`):

* batches as large as free GPU memory allows (``generation-batch-size = 0``);
* bf16 where the GPU supports it, fp16 otherwise (:func:`generation_dtype`);
* fused QKV projections and ``torch.compile`` of the UNet and the VAE decoder (CUDA); a compiled pipeline
  pads the last batch to the full batch size, because every new batch shape would compile again;
* images leave the pipeline as tensors, become uint8 on the GPU, and are PNG-encoded and written by a
  pool of threads (:class:`~oscar_server.stages.image_writer.PngWriter`) while the GPU works on the next batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import is_compiled_module

from oscar_common.config import OscarConfig
from oscar_common.devices import resolve_dtype
from oscar_common.logs import progress
from oscar_server.stages.image_writer import PngWriter
from oscar_server.stages.synthesis_jobs import SynthesisJob

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 4  # CPU throughput barely changes with batch size; small batches show progress sooner
MAX_AUTO_BATCH_SIZE = 32  # measured on an H200: batch 8 -> 32 gains ~7%, larger gains nothing
# Peak memory of one image (a CFG pair through the UNet, then the VAE decoder) at 512x512 in 16-bit
# floats: a generous figure, so that batch 32 is chosen only with ~40 GB free.
BYTES_PER_IMAGE_512 = 1 << 30


@dataclass
class GenerationResult:
    written: list[Path]
    skipped_existing: list[Path]
    seconds: float


def generation_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it (no fp16 overflow in the VAE), else fp16; float32 on CPU."""
    if name == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return resolve_dtype(name, device)


def use_compile(setting: str, device: torch.device) -> bool:
    """The ``compile`` run-config switch: ``auto`` compiles on CUDA only (on CPU compiling costs more
    than it saves for a few images)."""
    setting = setting.lower()
    return device.type == "cuda" if setting == "auto" else setting == "true"


def configure_cuda(*, tf32: bool) -> None:
    """TensorFloat-32 for float32 matmuls (the inversion's text encoder) and cuDNN autotuning for the
    fixed-shape convolutions of the UNet and VAE. Nothing changes without CUDA."""
    if not torch.cuda.is_available():
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True


def auto_batch_size(pipe: StableDiffusionPipeline, resolution: int) -> int:
    """The batch size for ``generation-batch-size = 0``: from free memory on CUDA (call after loading the
    pipeline), :data:`CPU_BATCH_SIZE` elsewhere."""
    if pipe.device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(pipe.device)
    pixels = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    per_image = BYTES_PER_IMAGE_512 * (pixels / 512) ** 2 * pipe.dtype.itemsize / 2
    return max(1, min(MAX_AUTO_BATCH_SIZE, int(0.8 * free / per_image)))


def prepare_pipeline(pipe: StableDiffusionPipeline, *, fuse_qkv: bool, compile: bool, compile_mode: str,
                     batch_size: int, resolution: int, guidance_scale: float) -> float:
    """Fuse QKV projections and compile the UNet and VAE decoder, as asked. Compiling happens in a short
    warm-up call at the real batch shape; returns its seconds (0 without compiling). If compiling fails,
    the pipeline stays uncompiled and a warning says why."""
    if fuse_qkv:
        pipe.fuse_qkv_projections()
    if not compile:
        return 0.0
    unet, decode = pipe.unet, pipe.vae.decode
    pipe.unet = torch.compile(unet, mode=compile_mode)
    pipe.vae.decode = torch.compile(decode, mode=compile_mode)
    started = time.perf_counter()
    try:
        size = resolution or None
        # Two steps reach every compiled shape: the UNet's [2 * batch] CFG input and the decoder's batch.
        pipe([""] * batch_size, height=size, width=size, num_inference_steps=2, guidance_scale=guidance_scale,
             output_type="pt")
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
    except Exception as exc:  # a missing compiler or an unsupported op must not cost the run
        pipe.unet, pipe.vae.decode = unet, decode
        logger.warning("torch.compile failed (%s: %s); generating without it", type(exc).__name__, exc)
        return 0.0
    seconds = time.perf_counter() - started
    logger.info("compiled the UNet and VAE decoder (mode %s, batch %d) in %.1f s", compile_mode, batch_size, seconds)
    return seconds


@dataclass
class PreparedPipeline:
    batch_size: int  # images per pipeline call
    compile_asked: bool  # the run's ``compile`` switch on this device (auto: CUDA only)
    compiled: bool  # whether the UNet ended up compiled (prepare_pipeline falls back, with a warning, if not)
    compile_seconds: float  # prepare_pipeline's warm-up call; 0 without compiling


def prepare_generation(pipe: StableDiffusionPipeline, cfg: OscarConfig, device: torch.device, *,
                       images: int | None = None) -> PreparedPipeline:
    """Ready a loaded pipeline as the run config says, before its first image: the batch size
    (``generation-batch-size``; 0: from free memory; never more than ``images``, the images to come), then
    fused QKV and ``torch.compile`` at that batch size."""
    batch_size = cfg.generation_batch_size or auto_batch_size(pipe, cfg.image_resolution)
    if images is not None:
        batch_size = min(batch_size, images)
    compile = use_compile(cfg.compile, device)
    seconds = prepare_pipeline(pipe, fuse_qkv=cfg.fuse_qkv, compile=compile, compile_mode=cfg.compile_mode,
                               batch_size=batch_size, resolution=cfg.image_resolution,
                               guidance_scale=cfg.guidance_scale)
    return PreparedPipeline(batch_size=batch_size, compile_asked=compile, compiled=is_compiled_module(pipe.unet),
                            compile_seconds=seconds)


def generate_jobs(pipe: StableDiffusionPipeline, jobs: list[SynthesisJob], out_dir: Path, cfg: OscarConfig, *,
                  batch_size: int) -> GenerationResult:
    """:func:`generate_images` with the run config's guidance, steps, resolution and PNG writers."""
    return generate_images(pipe, jobs, out_dir, guidance_scale=cfg.guidance_scale,
                           num_inference_steps=cfg.num_inference_steps, resolution=cfg.image_resolution,
                           batch_size=batch_size, png_writers=cfg.png_writers)


def generate_images(
    pipe: StableDiffusionPipeline,
    jobs: list[SynthesisJob],
    out_dir: Path,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    resolution: int,
    batch_size: int,
    png_writers: int,
) -> GenerationResult:
    """Generate every job whose image is not yet in ``out_dir``; existing images are skipped, never rewritten.

    ``guidance_scale`` is diffusers' ``g``; ``resolution`` 0 keeps the pipeline's native size; ``png_writers``
    threads encode and write the PNGs (0: this thread does).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = [out_dir / j.relative_path for j in jobs]
    if len(set(paths)) != len(paths):
        raise ValueError("two synthesis jobs map to the same file (same client, class id and index?)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size} (resolve 0 with auto_batch_size)")
    skipped = [p for p in paths if p.exists()]
    pending = [j for j, p in zip(jobs, paths) if not p.exists()]
    if skipped:
        logger.info("Synthesis: %d of %d images already exist, skipping them", len(skipped), len(jobs))
    if not pending:
        return GenerationResult(written=[], skipped_existing=skipped, seconds=time.perf_counter() - start)

    size = resolution or None  # None: the pipeline's default (unet sample_size * vae_scale_factor)
    pad = is_compiled_module(pipe.unet)  # a compiled UNet would compile again for a smaller last batch
    negative_embeds: torch.Tensor | None = None
    with progress(total=len(pending), desc="synthesis", unit="img", logger=logger) as bar, \
            PngWriter(png_writers) as writer:
        # Batches never mix text jobs and embeds jobs: the pipeline takes one kind of conditioning per call.
        text_jobs = [j for j in pending if j.prompt is not None]
        embeds_jobs = [j for j in pending if j.prompt is None]
        for uses_text, group in ((True, text_jobs), (False, embeds_jobs)):
            for b in range(0, len(group), batch_size):
                batch = group[b : b + batch_size]
                padded = batch + [batch[-1]] * (batch_size - len(batch)) if pad else batch
                kwargs: dict = {}
                if uses_text:
                    # negative_prompt None: the pipeline encodes "" as the unconditional input.
                    kwargs["prompt"] = [j.prompt for j in padded]
                else:
                    if negative_embeds is None:
                        negative_embeds, _ = pipe.encode_prompt("", pipe.device, 1, False)
                    kwargs["prompt_embeds"] = torch.stack([j.prompt_embeds for j in padded]).to(
                        device=pipe.device, dtype=pipe.dtype)
                    kwargs["negative_prompt_embeds"] = negative_embeds.expand(len(padded), -1, -1)
                images = pipe(
                    **kwargs,
                    height=size,
                    width=size,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator(device="cpu").manual_seed(j.seed) for j in padded],
                    output_type="pt",
                ).images
                pixels = to_uint8_images(images[: len(batch)])
                writer.submit([(out_dir / j.relative_path, p) for j, p in zip(batch, pixels)])
                bar.update(len(batch))
    written = writer.written

    seconds = time.perf_counter() - start
    logger.info("Synthesis: wrote %d images in %.1f s (%.3f images/s)", len(written), seconds, len(written) / seconds)
    return GenerationResult(written=written, skipped_existing=skipped, seconds=seconds)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] (the pipeline's ``"pt"`` output) -> uint8 [B, H, W, 3] on the CPU, rounded
    as diffusers' own PIL conversion does, but on the tensor's device (4x less to copy off a GPU)."""
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
