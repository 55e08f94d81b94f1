"""The server's work between the upload and the broadcast: means -> synthetic images -> ResNet-18.

Kept apart from the Flower strategy so it can be read, tested and rerun without a federation.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from oscar_common.classifier import (
    TrainStats,
    build_classifier,
    classifier_to_bytes,
    train_classifier,
    train_transform,
)
from oscar_common.data import ImageListDataset
from oscar_common.config import OscarConfig
from oscar_common.files import atomic_write_bytes, atomic_write_json
from oscar_common.models import load_clip_text_encoder, load_diffusion_pipeline
from oscar_common.wire import Upload as ClientPayload  # replaced by the synthesis stage
from oscar_server.inversion import InvertedPrompt, invert_embeddings
from oscar_server.run_dir import RunDirectory
from oscar_server.synthesis import SynthesisJob, generate_images, jobs_for_embeddings, jobs_for_prompts

log = logging.getLogger("oscar.server")


@dataclass
class SynthesisSummary:
    scheme: str
    images: int
    generated: int
    seconds: float
    jobs: list[SynthesisJob] = field(default_factory=list)  # every image of the set, with its path
    prompts: list[dict[str, Any]] = field(default_factory=list)


def synthesize(cfg: OscarConfig, payloads: list[ClientPayload], run_dir: RunDirectory,
               device: torch.device, dtype: torch.dtype) -> SynthesisSummary:
    """Decode every (client, class) mean and generate ``images-per-class`` images for each."""
    started = time.monotonic()
    prompts: list[dict[str, Any]] = []
    if cfg.scheme == "pooled":
        jobs, prompts = _prompt_jobs(cfg, payloads, run_dir, device)
    else:
        jobs = _embedding_jobs(cfg, payloads)

    pipe = load_diffusion_pipeline(cfg.diffusion_model, device, dtype, scheduler=cfg.scheduler)
    result = generate_images(pipe, jobs, run_dir.synthetic_dir, guidance_scale=cfg.guidance_scale,
                             num_inference_steps=cfg.num_inference_steps,
                             batch_size=cfg.generation_batch_size, resolution=cfg.image_resolution)
    del pipe
    _release_memory()
    return SynthesisSummary(scheme=cfg.scheme, images=len(jobs), generated=len(result.written),
                            seconds=time.monotonic() - started, jobs=jobs, prompts=prompts)


def _prompt_jobs(cfg: OscarConfig, payloads: list[ClientPayload], run_dir: RunDirectory,
                 device: torch.device) -> tuple[list[SynthesisJob], list[dict[str, Any]]]:
    """pooled: invert all means in one batch into hard prompts, then prefix the class name."""
    inverted = _saved_prompts(run_dir, payloads)
    fresh = inverted is None
    if fresh:
        # Inversion optimises through the encoder: float32 even on GPU, where fp16 gradients underflow.
        tokenizer, text_model = load_clip_text_encoder(cfg.text_encoder, device, torch.float32)
        targets = torch.cat([torch.from_numpy(p.means) for p in payloads]).to(device)
        inverted = invert_embeddings(targets, tokenizer, text_model, num_tokens=cfg.inversion_tokens,
                                     steps=cfg.inversion_steps, lr=cfg.inversion_lr, seed=cfg.seed)
        del text_model
        _release_memory()

    jobs: list[SynthesisJob] = []
    records: list[dict[str, Any]] = []
    offset = 0
    for payload in payloads:
        class_ids = payload.class_ids.tolist()
        decoded = inverted[offset:offset + len(class_ids)]
        offset += len(class_ids)
        class_names = [cfg.class_names[c] for c in class_ids]
        texts = [cfg.prompt_template.format(class_name=name, prompt=d.text)
                 for name, d in zip(class_names, decoded)]
        jobs += jobs_for_prompts(payload.client_name, class_ids, class_names, texts,
                                 cfg.images_per_class, cfg.seed)
        records += [{"client": payload.client_name, "class_id": c, "class_name": name,
                     "decoded": d.text, "cosine": round(float(d.cosine), 4), "prompt": text}
                    for c, name, d, text in zip(class_ids, class_names, decoded, texts)]
    if fresh:
        atomic_write_json(run_dir.prompts_path, records)
        log.info("decoded %d prompts (mean cosine %.3f); saved to %s", len(records),
                 sum(r["cosine"] for r in records) / max(1, len(records)), run_dir.prompts_path)
    return jobs, records


def _saved_prompts(run_dir: RunDirectory, payloads: list[ClientPayload]) -> list[InvertedPrompt] | None:
    """A resumed run reuses the prompts it decoded before (inversion on a GPU is not bit-reproducible)."""
    if not run_dir.prompts_path.exists():
        return None
    saved = {(p["client"], p["class_id"]): p for p in json.loads(run_dir.prompts_path.read_text())}
    keys = [(p.client_name, c) for p in payloads for c in p.class_ids.tolist()]
    if not all(key in saved for key in keys):
        return None
    log.info("reusing the %d decoded prompts in %s", len(keys), run_dir.prompts_path)
    return [InvertedPrompt(text=saved[key]["decoded"], cosine=saved[key]["cosine"]) for key in keys]


def _embedding_jobs(cfg: OscarConfig, payloads: list[ClientPayload]) -> list[SynthesisJob]:
    """tokens: the per-token means are Stable Diffusion's ``prompt_embeds`` as they are."""
    jobs: list[SynthesisJob] = []
    for payload in payloads:
        class_ids = payload.class_ids.tolist()
        jobs += jobs_for_embeddings(payload.client_name, class_ids, [cfg.class_names[c] for c in class_ids],
                                    torch.from_numpy(payload.means), cfg.images_per_class, cfg.seed)
    return jobs


def train_on_synthetic(cfg: OscarConfig, run_dir: RunDirectory, jobs: list[SynthesisJob],
                       device: torch.device) -> tuple[bytes, TrainStats]:
    """Train ResNet-18 on the synthetic images; returns (weights as safetensors bytes, stats)."""
    items = [(run_dir.synthetic_dir / job.relative_path, job.class_id) for job in jobs]
    if not items:
        raise RuntimeError(f"no synthetic images under {run_dir.synthetic_dir}: nothing to train on")
    dataset = ImageListDataset(items, train_transform(cfg.classifier_image_size))
    log.info("training ResNet-18 on %d synthetic images, %d classes, %d epochs", len(items),
             len(cfg.class_names), cfg.epochs)
    model = build_classifier(len(cfg.class_names), pretrained=cfg.classifier_pretrained)
    stats = train_classifier(model, dataset, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                             seed=cfg.seed, device=device, checkpoint=run_dir.checkpoint_path)
    blob = classifier_to_bytes(model.cpu(), class_names=cfg.class_names)
    atomic_write_bytes(run_dir.model_path, blob)
    return blob, stats


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
