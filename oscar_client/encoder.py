"""Client-side OSCAR encoding: images -> BLIP captions -> CLIP text embeddings -> per-class means.

This is all a client computes (nothing is trained): the per-class means are the whole upload. The
conditioning scheme decides the text encoder (README: "Divergences"): ``pooled`` uses the CLIP text tower and gives
``[K, 512]`` means; ``tokens`` uses the diffusion model's own text encoder and gives ``[K, 77, H]`` means.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from oscar_common.logs import progress
from transformers import BlipForConditionalGeneration, BlipProcessor

from oscar_common.choices import SCHEMES
from oscar_common.models import load_captioner, load_clip_text_encoder, load_diffusion_text_encoder
from oscar_common.text_encoding import encode_pooled, encode_tokens

log = logging.getLogger(__name__)


@dataclass
class EncodedClient:
    """What one client computed. ``means[i]`` belongs to class ``class_ids[i]`` and averages ``counts[i]`` images."""

    class_ids: np.ndarray  # int64 [K], sorted
    counts: np.ndarray  # int64 [K]
    means: np.ndarray  # float32 [K, D] (pooled) or [K, 77, H] (tokens)
    captions: list[str]  # one per input image, in input order


@torch.inference_mode()
def caption_images(
    images: Sequence[Image.Image],
    processor: BlipProcessor,
    model: BlipForConditionalGeneration,
    batch_size: int = 16,
    max_new_tokens: int = 30,
) -> list[str]:
    """Unconditional BLIP captions (greedy, as the checkpoint's generation config says), one per image."""
    captions: list[str] = []
    for start in progress(range(0, len(images), batch_size), desc="captioning", unit="batch", logger=log):
        batch = [image.convert("RGB") for image in images[start : start + batch_size]]
        inputs = processor(images=batch, return_tensors="pt").to(model.device, model.dtype)
        output_ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        captions.extend(text.strip() for text in processor.batch_decode(output_ids, skip_special_tokens=True))
    return captions


def class_means(
    embeddings: np.ndarray, labels: np.ndarray, min_count: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class means of ``embeddings`` (``[N, ...]``), for classes with at least ``min_count`` samples.

    Returns ``(class_ids, counts, means)`` sorted by class id. Pooled embeddings are unit vectors but their
    mean is deliberately *not* renormalised: the paper uploads the plain average (its norm also says how
    consistent the captions of a class were).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    ids, counts = np.unique(labels, return_counts=True)  # sorted ids
    keep = counts >= min_count
    ids, counts = ids[keep], counts[keep]
    means = np.zeros((len(ids), *embeddings.shape[1:]), dtype=np.float32)
    for i, class_id in enumerate(ids):
        # float64 accumulation: a class can hold thousands of [77, 768] rows.
        means[i] = embeddings[labels == class_id].mean(axis=0, dtype=np.float64)
    return ids.astype(np.int64), counts.astype(np.int64), means


def encode_local_data(
    images: Sequence[Image.Image],
    labels: Sequence[int] | np.ndarray,
    *,
    scheme: str,
    captioner_id: str,
    encoder_id: str,
    device: torch.device,
    dtype: torch.dtype,
    min_count: int = 1,
    caption_batch_size: int = 16,
    caption_max_tokens: int = 30,
    cache_dir: str | Path | None = None,
) -> EncodedClient:
    """Caption, encode and average a client's labelled images under ``scheme`` (``pooled`` or ``tokens``).

    ``encoder_id`` is a CLIP checkpoint for ``pooled`` and a Stable Diffusion repo for ``tokens`` (the
    server's instruction says which). ``cache_dir`` overrides HF_HUB_CACHE (see oscar_common.models).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    log.info("encoding %d images of %d classes (scheme %s, captioner %s, encoder %s, %s)",
             len(images), len(np.unique(labels)), scheme, captioner_id, encoder_id, device)

    start = time.perf_counter()
    processor, captioner = load_captioner(captioner_id, device, dtype, cache_dir=cache_dir)
    captions = caption_images(images, processor, captioner, caption_batch_size, caption_max_tokens)
    del processor, captioner  # only one frozen model in memory at a time
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("captioned %d images in %.1f s", len(captions), time.perf_counter() - start)

    start = time.perf_counter()
    if scheme == "pooled":
        tokenizer, text_model = load_clip_text_encoder(encoder_id, device, dtype, cache_dir=cache_dir)
        embeddings = encode_pooled(captions, tokenizer, text_model)
    else:
        tokenizer, text_model = load_diffusion_text_encoder(encoder_id, device, dtype, cache_dir=cache_dir)
        embeddings = encode_tokens(captions, tokenizer, text_model)
    class_ids, counts, means = class_means(embeddings.numpy(), labels, min_count)
    dropped = len(np.unique(labels)) - len(class_ids)
    log.info("encoded %d captions into %d class means of shape %s in %.1f s%s", len(captions), len(class_ids),
             tuple(means.shape[1:]), time.perf_counter() - start,
             f" ({dropped} classes with < {min_count} images dropped)" if dropped else "")
    return EncodedClient(class_ids=class_ids, counts=counts, means=means, captions=captions)
