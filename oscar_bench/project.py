"""What the benchmark needs around the stages' own functions, which the sections call directly.

The sections time the stages' code, with the run config's values:

* synthesis: ``generation_dtype``, :func:`project_pipeline` (``oscar_common.models.loading``' setup of a loaded
  pipeline, on parts built with random weights, standing in for the checkpoint the stage loads),
  ``prepare_generation`` (the batch size from free memory, fused QKV, ``torch.compile`` on CUDA, whose
  warm-up seconds it returns), :func:`project_generate` (``plan_jobs`` + ``generate_jobs``: the PNG writer
  pool, the images written); all inside :func:`stage_cuda_settings`, as the stage calls ``configure_cuda``
  first (:mod:`oscar_server.stages.generation`);
* training: :func:`project_train`: decode once, the classifier, its training loop with the run's recipe
  and precision (:mod:`oscar_server.stages.fitting`);
* inversion: ``invert_targets`` in chunks of ``inversion_chunk`` targets (:mod:`oscar_server.stages.prompts`).

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

from oscar_bench.architectures import DiffusionParts
from oscar_common.config import OscarConfig
from oscar_common.models.loading import setup_diffusion_pipeline
from oscar_server.stages.fitting import (
    decode_training_images,
    fit_classifier,
    new_classifier,
    training_decode_workers,
    training_recipe,
)
from oscar_server.stages.generation import configure_cuda, generate_jobs
from oscar_server.stages.synthesis_jobs import UploadRow, plan_jobs

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
def project_pipeline(parts: DiffusionParts, *, device: torch.device, config: OscarConfig) -> StableDiffusionPipeline:
    """The pipeline as ``load_diffusion_pipeline`` leaves it, from parts (already in the run's dtype)
    instead of a checkpoint."""
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    setup_diffusion_pipeline(pipe, device, scheduler=config.scheduler)
    return pipe


def project_generate(pipe: StableDiffusionPipeline, *, prompts: Sequence[str], out_dir: Path, config: OscarConfig,
                     batch_size: int, first_index: int = 0) -> int:
    """Synthesise one PNG per prompt into ``out_dir`` the way the synthesis stage does (one class per prompt,
    one image per class); returns how many were written. ``first_index`` keeps the files of successive
    calls apart (the stage skips existing ones)."""
    class_ids = range(first_index, first_index + len(prompts))
    rows = [UploadRow(BENCH_CLIENT, class_id, 0, row) for row, class_id in enumerate(class_ids)]
    jobs = plan_jobs(rows, list(prompts), class_names=tuple(f"class{i}" for i in range(class_ids.stop)),
                     images_per_class=1, base_seed=config.seed)
    return len(generate_jobs(pipe, jobs, out_dir, config, batch_size=batch_size).written)


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
    """Train the server's classifier on PNG files with the training stage's functions: decode once, then
    one epoch to warm up and ``epochs`` timed ones, with the run's recipe and precision. ImageNet weights
    are not used (nothing is downloaded; same cost)."""
    config = config.replace(class_names=tuple(f"class{i}" for i in range(num_classes)), classifier_pretrained=False,
                            classifier_image_size=image_size)
    recipe = training_recipe(config)
    data = decode_training_images(items, config, recipe, device)
    model = new_classifier(config)
    first = fit_classifier(model, data, config, dataclasses.replace(recipe, epochs=1), device, log_every_epoch=False)
    timed = fit_classifier(model, data, config, dataclasses.replace(recipe, epochs=epochs), device,
                           log_every_epoch=False)
    return TrainingTimes(first_epoch_seconds=data.seconds + first.seconds, epochs=epochs, seconds=timed.seconds,
                         batch_size=recipe.batch_size, num_workers=training_decode_workers(config, len(items)),
                         precision=timed.precision)
