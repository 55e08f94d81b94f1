"""Every call the benchmark makes into the project's own code, one small function each.

The server's stages are being reshaped (issue 8: ``oscar_server/generation.py`` + ``synthesize.py``,
``oscar_server/train.py`` + ``oscar_common/classifier.py``, chunked inversion). When they land, re-point
these functions and nothing else: the sections time whatever these call.

No module imported here (or by them) may import ``flwr``: the GPU machine the benchmark runs on has no
Flower. That rules out ``oscar_common.config`` and ``oscar_common.models`` today (both reach ``flwr.app``
through ``oscar_common.wire``), so the run's defaults are read from pyproject's ``[tool.flwr.app.config]``
(their one home) and :func:`project_pipeline` repeats the few setup lines of
``oscar_common.models.load_diffusion_pipeline`` that follow the checkpoint download.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

from oscar_bench.architectures import DiffusionParts
from oscar_common.classifier import build_classifier
from oscar_common.image_cache import decode_images, decode_workers
from oscar_common.recipes import resolve_recipe
from oscar_common.training import train_classifier
from oscar_server.generation import auto_batch_size, generation_dtype
from oscar_common.inversion import InvertedPrompt, invert_embeddings
from oscar_server.synthesis import generate_images, jobs_for_prompts

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The run-config defaults a user's run starts from (``[tool.flwr.app.config]``)."""
    if not pyproject.is_file():
        raise FileNotFoundError(
            f"{pyproject} not found: run oscar-bench from a checkout of the project (it reads the run's "
            "defaults from pyproject.toml's [tool.flwr.app.config])")
    with pyproject.open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def project_dtype(defaults: dict[str, Any], device: torch.device) -> torch.dtype:
    """The dtype a user's run synthesises in (``dtype = auto``: bf16 on GPUs with it, else float16; float32 on CPU)."""
    return generation_dtype(str(defaults["dtype"]), device)


# --------------------------------------------------------------------------------------- synthesis
def project_pipeline(parts: DiffusionParts, *, device: torch.device, dtype: torch.dtype,
                     scheduler: str) -> StableDiffusionPipeline:
    """The pipeline as ``load_diffusion_pipeline`` leaves it, from parts instead of a checkpoint."""
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    elif scheduler == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "default":
        raise ValueError(f"unknown scheduler {scheduler!r} in the run config")
    pipe.to(device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def project_batch_size(pipe: StableDiffusionPipeline, defaults: dict[str, Any]) -> int:
    """How many images one pipeline call of a user's run generates (``generation-batch-size``; 0: from free
    GPU memory)."""
    return int(defaults["generation-batch-size"]) or auto_batch_size(pipe, int(defaults["image-resolution"]))


def project_generate(pipe: StableDiffusionPipeline, *, prompts: Sequence[str], out_dir: Path,
                     defaults: dict[str, Any], steps: int, resolution: int, first_index: int = 0) -> int:
    """Synthesise one PNG per prompt into ``out_dir`` the way a run's synthesis stage does; returns how
    many were written. ``first_index`` keeps the files of successive calls apart (existing ones are skipped)."""
    jobs = jobs_for_prompts("bench", list(range(first_index, first_index + len(prompts))),
                            [f"class{first_index + i}" for i in range(len(prompts))], list(prompts),
                            images_per_class=1, base_seed=int(defaults["seed"]))
    result = generate_images(pipe, jobs, out_dir, guidance_scale=float(defaults["guidance-scale"]),
                             num_inference_steps=steps, batch_size=project_batch_size(pipe, defaults),
                             resolution=resolution)
    return len(result.written)


# ---------------------------------------------------------------------------------------- training
@dataclass
class TrainingTimes:
    first_epoch_seconds: float  # decoding the PNGs once + the first epoch (cuDNN autotuning)
    epochs: int  # timed epochs after the first
    seconds: float
    batch_size: int
    num_workers: int


def project_train(items: Sequence[tuple[Path, int]], *, num_classes: int, image_size: int, epochs: int,
                  device: torch.device, defaults: dict[str, Any]) -> TrainingTimes:
    """Train the server's classifier on PNG files as a run's training stage does (oscar_server.train):
    decode once, then one epoch to warm up and ``epochs`` timed ones, with the run's recipe and precision.
    ImageNet weights are not used (nothing is downloaded; same cost)."""
    recipe = resolve_recipe(str(defaults["train-recipe"]), epochs=int(defaults["epochs"]), lr=float(defaults["lr"]),
                            batch_size=int(defaults["batch-size"]))
    workers = decode_workers(int(defaults["decode-workers"]), len(items), 1)
    data = decode_images([path for path, _ in items], [label for _, label in items],
                         side=recipe.cache_size(image_size), device=device, num_workers=workers)
    model = build_classifier(num_classes, pretrained=False, seed=0)
    common = dict(image_size=image_size, seed=int(defaults["seed"]), device=device,
                  precision=str(defaults["train-precision"]), log_every_epoch=False)
    first = train_classifier(model, data, recipe=dataclasses.replace(recipe, epochs=1), **common)
    timed = train_classifier(model, data, recipe=dataclasses.replace(recipe, epochs=epochs), **common)
    return TrainingTimes(first_epoch_seconds=data.seconds + first.seconds, epochs=epochs, seconds=timed.seconds,
                         batch_size=recipe.batch_size, num_workers=workers)


# --------------------------------------------------------------------------------------- inversion
def project_invert(targets: torch.Tensor, tokenizer, text_model, *, steps: int, eval_every: int,
                   defaults: dict[str, Any]) -> list[InvertedPrompt]:
    """Hard-prompt inversion of ``targets`` [N, D] as the synthesis stage runs it (all N together)."""
    return invert_embeddings(targets, tokenizer, text_model, num_tokens=int(defaults["inversion-tokens"]),
                             steps=steps, lr=float(defaults["inversion-lr"]), seed=int(defaults["seed"]),
                             eval_every=eval_every)
