"""Compatibility layer for ``oscar_server.pipeline`` until the strategy calls the synthesis stage
(:mod:`oscar_server.synthesize`); deleted together with pipeline.py. New code imports
:mod:`oscar_server.synthesis_jobs` and :mod:`oscar_server.generation`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline

from oscar_server.generation import GenerationResult, auto_batch_size
from oscar_server.generation import generate_images as _generate_images
from oscar_server.synthesis_jobs import SynthesisJob, image_seed

__all__ = ["SynthesisJob", "image_seed", "generate_images", "jobs_for_prompts", "jobs_for_embeddings"]


def jobs_for_prompts(client: str, class_ids: Sequence[int], class_names: Sequence[str], prompts: Sequence[str],
                     images_per_class: int, base_seed: int) -> list[SynthesisJob]:
    return [SynthesisJob(client, int(c), name, i, image_seed(base_seed, client, int(c), i), prompt=prompt)
            for c, name, prompt in zip(class_ids, class_names, prompts) for i in range(images_per_class)]


def jobs_for_embeddings(client: str, class_ids: Sequence[int], class_names: Sequence[str], embeds: torch.Tensor,
                        images_per_class: int, base_seed: int) -> list[SynthesisJob]:
    return [SynthesisJob(client, int(c), name, i, image_seed(base_seed, client, int(c), i), prompt_embeds=e)
            for c, name, e in zip(class_ids, class_names, embeds) for i in range(images_per_class)]


def generate_images(pipe: StableDiffusionPipeline, jobs: list[SynthesisJob], out_dir: Path, *,
                    guidance_scale: float, num_inference_steps: int, batch_size: int,
                    resolution: int) -> GenerationResult:
    return _generate_images(pipe, jobs, out_dir, guidance_scale=guidance_scale,
                            num_inference_steps=num_inference_steps, resolution=resolution,
                            batch_size=batch_size or auto_batch_size(pipe, resolution), png_writers=4)
