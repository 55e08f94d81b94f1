"""Every call the benchmark makes into the project's own code, one small function each.

The sections time whatever these call, and these call what the server's stages call, in the same order
and with the same run-config values:

* synthesis (``oscar_server.synthesize``'s ``_generate``): :func:`project_dtype` (bf16/fp16 on CUDA),
  :func:`project_pipeline` (``oscar_common.models``' setup of a loaded pipeline, on parts built with random
  weights), :func:`project_prepare` (the batch size from free memory, fused QKV, ``torch.compile`` on CUDA,
  whose warm-up seconds it returns), :func:`project_generate` (``plan_jobs`` + ``generate_images``: the
  PNG writer pool, the images written); all inside :func:`stage_cuda_settings`, as the stage calls
  ``configure_cuda`` first;
* training (``oscar_server.train``): decode once, ``train_classifier`` with the run's recipe and precision;
* inversion (``oscar_server.prompts``): ``invert_embeddings`` in chunks sized from free memory.

The run's values come from :class:`~oscar_common.config.OscarConfig` (the defaults a user's run starts
from), with the benchmark's scale applied through ``OscarConfig.replace`` (fewer steps or a smaller
image on a CPU). No module imported here (or by them) may import ``flwr``: the GPU machine the benchmark
runs on has no Flower (a test imports the package with ``flwr`` blocked).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import is_compiled_module

from oscar_bench.architectures import DiffusionParts
from oscar_common.classifier import build_classifier
from oscar_common.config import OscarConfig
from oscar_common.image_cache import decode_images, decode_workers
from oscar_common.inversion import InvertedPrompt, invert_embeddings, inversion_chunk_size
from oscar_common.models import setup_diffusion_pipeline
from oscar_common.recipes import resolve_recipe
from oscar_common.training import train_classifier
from oscar_server.generation import (
    auto_batch_size,
    configure_cuda,
    generate_images,
    generation_dtype,
    prepare_pipeline,
    use_compile,
)
from oscar_server.synthesis_jobs import UploadRow, plan_jobs

BENCH_CLIENT = "bench"  # the client name of the benchmark's synthesis jobs (it names the files)


@contextlib.contextmanager
def stage_cuda_settings(config: OscarConfig) -> Iterator[None]:
    """``configure_cuda`` as the synthesis stage applies it (TF32, cuDNN autotuning), undone on exit: the
    official-style loop, timed before, keeps torch's defaults, as the official code ran."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    configure_cuda(tf32=config.tf32)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


# --------------------------------------------------------------------------------------- synthesis
def project_dtype(config: OscarConfig, device: torch.device) -> torch.dtype:
    """The dtype a user's run synthesises in (``dtype = auto``: bf16 on GPUs with it, else float16; float32 on CPU)."""
    return generation_dtype(config.dtype, device)


def project_pipeline(parts: DiffusionParts, *, device: torch.device, config: OscarConfig) -> StableDiffusionPipeline:
    """The pipeline as ``load_diffusion_pipeline`` leaves it, from parts (already in the run's dtype)
    instead of a checkpoint."""
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    setup_diffusion_pipeline(pipe, device, scheduler=config.scheduler)
    return pipe


@dataclass
class PreparedPipeline:
    batch_size: int  # images per pipeline call
    compile_asked: bool  # the run's ``compile`` switch on this device (auto: CUDA only)
    compiled: bool  # whether the UNet ended up compiled (prepare_pipeline falls back, with a warning, if not)
    compile_seconds: float  # prepare_pipeline's warm-up call; 0 without compiling


def project_prepare(pipe: StableDiffusionPipeline, *, device: torch.device, config: OscarConfig) -> PreparedPipeline:
    """Batch size (``generation-batch-size``; 0: from free GPU memory), then fused QKV and ``torch.compile``
    as the run config says, as the stage does before its first image."""
    batch_size = config.generation_batch_size or auto_batch_size(pipe, config.image_resolution)
    compile = use_compile(config.compile, device)
    seconds = prepare_pipeline(pipe, fuse_qkv=config.fuse_qkv, compile=compile, compile_mode=config.compile_mode,
                               batch_size=batch_size, resolution=config.image_resolution,
                               guidance_scale=config.guidance_scale)
    return PreparedPipeline(batch_size=batch_size, compile_asked=compile, compiled=is_compiled_module(pipe.unet),
                            compile_seconds=seconds)


def project_generate(pipe: StableDiffusionPipeline, *, prompts: Sequence[str], out_dir: Path, config: OscarConfig,
                     batch_size: int, first_index: int = 0) -> int:
    """Synthesise one PNG per prompt into ``out_dir`` the way the synthesis stage does (one class per prompt,
    one image per class); returns how many were written. ``first_index`` keeps the files of successive
    calls apart (the stage skips existing ones)."""
    class_ids = range(first_index, first_index + len(prompts))
    rows = [UploadRow(BENCH_CLIENT, class_id, 0, row) for row, class_id in enumerate(class_ids)]
    jobs = plan_jobs(rows, list(prompts), class_names=tuple(f"class{i}" for i in range(class_ids.stop)),
                     images_per_class=1, base_seed=config.seed)
    result = generate_images(pipe, jobs, out_dir, guidance_scale=config.guidance_scale,
                             num_inference_steps=config.num_inference_steps, resolution=config.image_resolution,
                             batch_size=batch_size, png_writers=config.png_writers)
    return len(result.written)


# ---------------------------------------------------------------------------------------- training
@dataclass
class TrainingTimes:
    first_epoch_seconds: float  # decoding the PNGs once + the first epoch (cuDNN autotuning)
    epochs: int  # timed epochs after the first
    seconds: float
    batch_size: int
    num_workers: int
    precision: str  # what train-precision resolved to


def project_train(items: Sequence[tuple[Path, int]], *, num_classes: int, image_size: int, epochs: int,
                  device: torch.device, config: OscarConfig) -> TrainingTimes:
    """Train the server's classifier on PNG files as a run's training stage does (oscar_server.train):
    decode once, then one epoch to warm up and ``epochs`` timed ones, with the run's recipe and precision.
    ImageNet weights are not used (nothing is downloaded; same cost)."""
    recipe = resolve_recipe(config.train_recipe, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size)
    workers = decode_workers(config.decode_workers, len(items), 1)
    data = decode_images([path for path, _ in items], [label for _, label in items],
                         side=recipe.cache_size(image_size), device=device, num_workers=workers)
    model = build_classifier(num_classes, pretrained=False, seed=config.seed)
    common = dict(image_size=image_size, seed=config.seed, device=device, precision=config.train_precision,
                  log_every_epoch=False)
    first = train_classifier(model, data, recipe=dataclasses.replace(recipe, epochs=1), **common)
    timed = train_classifier(model, data, recipe=dataclasses.replace(recipe, epochs=epochs), **common)
    return TrainingTimes(first_epoch_seconds=data.seconds + first.seconds, epochs=epochs, seconds=timed.seconds,
                         batch_size=recipe.batch_size, num_workers=workers, precision=timed.precision)


# --------------------------------------------------------------------------------------- inversion
def project_invert(targets: torch.Tensor, tokenizer, text_model, *, steps: int, eval_every: int,
                   config: OscarConfig) -> list[InvertedPrompt]:
    """Hard-prompt inversion of ``targets`` [N, D] as the synthesis stage runs it: in chunks of
    ``inversion-chunk-size`` targets (0: from free memory). Call inside :func:`stage_cuda_settings`."""
    return invert_embeddings(targets, tokenizer, text_model, num_tokens=config.inversion_tokens, steps=steps,
                             lr=config.inversion_lr, seed=config.seed, eval_every=eval_every,
                             chunk_size=config.inversion_chunk_size)


def project_inversion_chunk(targets: int, text_model, config: OscarConfig) -> int:
    """How many targets :func:`project_invert` optimises at once (``invert_embeddings``' own choice)."""
    return min(targets, config.inversion_chunk_size or inversion_chunk_size(text_model, config.inversion_tokens))
