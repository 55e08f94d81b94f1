"""Synthetic images from client conditioning, with classifier-free guidance (both schemes).

Each image is one :class:`SynthesisJob`: a (client, class, index) triple with its own deterministic seed
and either a text prompt (``pooled`` scheme: the inverted prompt, prefixed by the class name) or per-token
``prompt_embeds`` (``tokens`` scheme: the client's mean of the diffusion model's text-encoder states).
Guidance is diffusers' ``eps_u + g * (eps_c - eps_u)``, with the empty prompt as the unconditional input,
as in the paper (its ``s`` is ``g - 1``).

Images are written in torchvision ImageFolder layout (one folder per class name), atomically, and never
overwritten, so a restarted server regenerates exactly the missing images, identical to what they would
have been.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline
from oscar_common.logs import progress

from oscar_common.files import atomic_write_bytes, safe_filename

logger = logging.getLogger(__name__)


def image_seed(base_seed: int, client: str, class_id: int, index: int) -> int:
    """A 63-bit seed that depends only on these fields (not on job order, batch or restart)."""
    digest = hashlib.sha256(f"oscar-image/{base_seed}/{client}/{class_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class SynthesisJob:
    client: str
    class_id: int
    class_name: str
    index: int
    seed: int
    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = field(default=None, repr=False)  # [77, H] for one image

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("a SynthesisJob needs exactly one of prompt and prompt_embeds")

    @property
    def relative_path(self) -> Path:
        name = f"{safe_filename(self.client)}__c{self.class_id:04d}__{self.index:03d}.png"
        return Path(safe_filename(self.class_name)) / name


@dataclass
class SynthesisResult:
    written: list[Path]
    skipped_existing: list[Path]
    seconds: float


def jobs_for_prompts(
    client: str,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    prompts: Sequence[str],
    images_per_class: int,
    base_seed: int,
) -> list[SynthesisJob]:
    """``images_per_class`` prompt jobs per class; ``class_names`` and ``prompts`` are aligned with
    ``class_ids`` (prompts are used as given: apply the prompt template before)."""
    _check_aligned(class_ids, class_names, prompts)
    return [
        SynthesisJob(client, int(c), name, i, image_seed(base_seed, client, int(c), i), prompt=prompt)
        for c, name, prompt in zip(class_ids, class_names, prompts)
        for i in range(images_per_class)
    ]


def jobs_for_embeddings(
    client: str,
    class_ids: Sequence[int],
    class_names: Sequence[str],
    embeds: torch.Tensor,
    images_per_class: int,
    base_seed: int,
) -> list[SynthesisJob]:
    """``images_per_class`` prompt-embeds jobs per class; ``embeds`` is [K, 77, H], aligned with ``class_ids``."""
    if embeds.ndim != 3:
        raise ValueError(f"embeds must be [K, seq, hidden], got shape {tuple(embeds.shape)}")
    _check_aligned(class_ids, class_names, embeds)
    return [
        SynthesisJob(client, int(c), name, i, image_seed(base_seed, client, int(c), i), prompt_embeds=e)
        for c, name, e in zip(class_ids, class_names, embeds)
        for i in range(images_per_class)
    ]


def _check_aligned(class_ids: Sequence[int], *others: Sequence) -> None:
    if any(len(o) != len(class_ids) for o in others):
        raise ValueError(f"class_ids, class_names and conditioning differ in length: "
                         f"{[len(class_ids), *(len(o) for o in others)]}")


def generate_images(
    pipe: StableDiffusionPipeline,
    jobs: list[SynthesisJob],
    out_dir: Path,
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    batch_size: int = 8,
    resolution: int = 0,
) -> SynthesisResult:
    """Generate every job whose image is not yet in ``out_dir``; existing images are skipped, never rewritten.

    ``guidance_scale`` is diffusers' ``g``; ``resolution`` 0 keeps the pipeline's native size. Each image
    gets its own CPU generator seeded with ``job.seed``, so it does not depend on the batch it falls in.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = [out_dir / j.relative_path for j in jobs]
    if len(set(paths)) != len(paths):
        raise ValueError("two synthesis jobs map to the same file (same client, class id and index?)")
    skipped = [p for p in paths if p.exists()]
    pending = [j for j, p in zip(jobs, paths) if not p.exists()]
    if skipped:
        logger.info("Synthesis: %d of %d images already exist, skipping them", len(skipped), len(jobs))

    size = resolution or None  # None: the pipeline's default (unet sample_size * vae_scale_factor)
    negative_embeds: torch.Tensor | None = None
    written: list[Path] = []
    with progress(total=len(pending), desc="synthesis", unit="img", logger=logger) as bar:
        # Batches never mix text jobs and embeds jobs: the pipeline takes one kind of conditioning per call.
        text_jobs = [j for j in pending if j.prompt is not None]
        embeds_jobs = [j for j in pending if j.prompt is None]
        for uses_text, group in ((True, text_jobs), (False, embeds_jobs)):
            for b in range(0, len(group), batch_size):
                batch = group[b : b + batch_size]
                kwargs: dict = {}
                if uses_text:
                    # negative_prompt None: the pipeline encodes "" as the unconditional input.
                    kwargs["prompt"] = [j.prompt for j in batch]
                else:
                    if negative_embeds is None:
                        negative_embeds, _ = pipe.encode_prompt("", pipe.device, 1, False)
                    kwargs["prompt_embeds"] = torch.stack([j.prompt_embeds for j in batch]).to(
                        device=pipe.device, dtype=pipe.dtype)
                    kwargs["negative_prompt_embeds"] = negative_embeds.expand(len(batch), -1, -1)
                images = pipe(
                    **kwargs,
                    height=size,
                    width=size,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=[torch.Generator(device="cpu").manual_seed(j.seed) for j in batch],
                    output_type="pil",
                ).images
                for job, image in zip(batch, images):
                    path = out_dir / job.relative_path
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    # Atomic: a crash never leaves a partial PNG that a restart would take for a finished one.
                    atomic_write_bytes(path, buffer.getvalue())
                    written.append(path)
                bar.update(len(batch))

    seconds = time.perf_counter() - start
    if written:
        logger.info("Synthesis: wrote %d images in %.1f s (%.3f images/s)", len(written), seconds,
                    len(written) / seconds)
    return SynthesisResult(written=written, skipped_existing=skipped, seconds=seconds)
