"""Client-side OSCAR encoding: image files -> captions -> text embeddings -> per-class sums and means.

This is all a client computes (nothing is trained): the per-class means are the whole upload. The
conditioning scheme decides the text encoder (docs/official-code.md): ``pooled`` uses the CLIP text tower
and gives ``[K, 512]`` means; ``tokens`` uses the diffusion model's own text encoder and gives
``[K, 77, H]`` means.

:func:`encode_client` streams: images are decoded by DataLoader workers batch by batch
(``oscar_client.captioning``), captions already in the client's caption cache are not generated again
(``oscar_client.caption_cache``), and embeddings go into running per-class sums
(``oscar_client.class_accumulator``) one batch at a time. Memory is bounded by a batch, not by the data
set; only the captions (a few dozen bytes each) are kept for every image. One frozen model is in memory at
a time: the captioner, then the text encoder (captioning dominates the time; text encoding is cheap).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from oscar_client.caption_cache import CaptionCache
from oscar_client.captioning import AUTO, caption_files, caption_settings, captioner_prompt
from oscar_client.class_accumulator import ClassAccumulator
from oscar_common.choices import SCHEMES
from oscar_common.data.local import Sample
from oscar_common.devices import free_device_memory
from oscar_common.logs import progress
from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH
from oscar_common.models.loading import (
    checkpoint_revision,
    load_captioner_model,
    load_captioner_processor,
    load_clip_text_encoder,
    load_diffusion_text_encoder,
    text_embedding_dim,
)
from oscar_common.models.text_encoding import encode_pooled, encode_tokens

__all__ = ["EncodedClient", "encode_client"]

log = logging.getLogger(__name__)

TEXT_BATCH_SIZE = 64  # fixed, so the same captions give bit-identical embeddings in every run
# keep_embeddings keeps every image's embedding: 2 KiB per image for pooled CLIP (2M images fit), but
# 77 x 768 x 4 = 231 KiB for SD 1.x tokens (about 18k images fit). Beyond this, encode_client refuses
# before any work starts rather than running out of memory after hours of captioning.
KEEP_EMBEDDINGS_MAX_BYTES = 4 * 2**30


@dataclass
class EncodedClient:
    """What one client computed. Row ``i`` of ``sums``/``means`` belongs to class ``class_ids[i]`` (an index
    into the class names) and sums ``counts[i]`` embeddings; every class with a readable image is present.
    ``captions``, ``paths``, ``labels`` and ``embeddings`` run over the readable samples, in input order."""

    class_ids: np.ndarray  # int64 [K], sorted
    counts: np.ndarray  # int64 [K]
    sums: np.ndarray  # float64 [K, D] (pooled) or [K, 77, H] (tokens)
    captions: list[str]  # [N]
    paths: list[Path]  # [N] the image each caption describes
    labels: np.ndarray  # int64 [N] class id of each caption
    unreadable: list[Sample]  # skipped: could not be read or decoded
    captioned: int  # captions generated in this run
    cached: int  # captions taken from the caption cache
    caption_settings: dict[str, Any] = field(default_factory=dict)  # what keyed the cache (captioner, revision, ...)
    embeddings: np.ndarray | None = None  # float32 [N, ...] raw embeddings, with keep_embeddings
    # tokens: the empty prompt's float32 [77, H] states from the same encoder. Public (anyone can compute
    # it), so differential privacy clips each caption's departure from it (oscar_client.privacy).
    empty_prompt: np.ndarray | None = None

    @property
    def means(self) -> np.ndarray:
        """float32 per-class means of every class, computed from the float64 sums.

        Deliberately *not* renormalised: the paper uploads the plain average of unit vectors (its norm also
        says how consistent a class's captions were)."""
        return (self.sums / self.counts.reshape(-1, *([1] * (self.sums.ndim - 1)))).astype(np.float32)


def encode_client(
    samples: Sequence[Sample],
    class_names: Sequence[str],
    *,
    scheme: str,
    captioner_id: str,
    encoder_id: str,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    max_new_tokens: int,
    num_workers: int,
    cache: CaptionCache | None,
    blip2_prompt: str = "",
    keep_embeddings: bool = False,
) -> EncodedClient:
    """Caption, encode and sum a client's labelled image files under ``scheme`` (``pooled`` or ``tokens``).

    ``samples`` are labelled by the index of their class in ``class_names``. ``batch_size`` 0 chooses by
    device (``oscar_client.captioning.resolve_batch_size``), ``num_workers`` -1 likewise. ``cache``: the
    client's caption cache, or None to caption everything. ``encoder_id`` is a CLIP checkpoint for
    ``pooled`` and a Stable Diffusion repo for ``tokens`` (the server's instruction says which).
    ``blip2_prompt``: the text prompt a BLIP-2 captioner continues (the run's ``blip2-prompt``; BLIP takes none).
    Models come from the hub cache that HF_HUB_CACHE names (see oscar_common.models.loading).
    """
    # 1. Check inputs (before any model is loaded)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({s.class_name for s in samples} - index.keys())
    if unknown:
        raise ValueError(f"samples of classes not in class_names: {', '.join(unknown)}")
    if not samples:
        raise ValueError("no training images to encode")
    if batch_size < 0:
        raise ValueError(f"caption batch size must be > 0, or 0 for automatic, got {batch_size}")
    if num_workers < AUTO:
        raise ValueError(f"caption workers must be >= 0, or {AUTO} for automatic, got {num_workers}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if keep_embeddings:
        _check_keep_budget(len(samples), scheme, encoder_id)
    labels = np.array([index[s.class_name] for s in samples], dtype=np.int64)
    log.info("encoding %d images of %d classes (scheme %s, captioner %s, encoder %s, %s)", len(samples),
             len(np.unique(labels)), scheme, captioner_id, encoder_id, device)

    # 2. Captions: from the cache where it has them, generated (streamed) for the rest
    settings = caption_settings(captioner_id, revision=checkpoint_revision(captioner_id), dtype=dtype,
                                max_new_tokens=max_new_tokens,
                                prompt=captioner_prompt(captioner_id, blip2_prompt))
    run = caption_files([s.path for s in samples], settings=settings, cache=cache, batch_size=batch_size,
                        num_workers=num_workers, max_new_tokens=max_new_tokens, device=device,
                        load_processor=lambda: load_captioner_processor(captioner_id),
                        load_model=lambda: load_captioner_model(captioner_id, device, dtype))
    captions = run.captions
    readable = [i for i, c in enumerate(captions) if c is not None]
    if not readable:
        raise ValueError(f"none of the {len(samples)} training images could be read")

    # 3. Encode the captions (in input order, fixed batches) into running per-class sums
    started = time.perf_counter()
    if scheme == "pooled":
        tokenizer, text_model = load_clip_text_encoder(encoder_id, device, dtype)
        encode = encode_pooled
    else:
        tokenizer, text_model = load_diffusion_text_encoder(encoder_id, device, dtype)
        encode = encode_tokens
    sums = ClassAccumulator(keep_embeddings=keep_embeddings)
    for start in progress(range(0, len(readable), TEXT_BATCH_SIZE), desc="encoding captions", unit="batch",
                          logger=log, leave=False):
        chunk = readable[start : start + TEXT_BATCH_SIZE]
        embeddings = encode([captions[i] for i in chunk], tokenizer, text_model, batch_size=TEXT_BATCH_SIZE)
        sums.add(embeddings.numpy(), labels[chunk])
    empty_prompt = encode([""], tokenizer, text_model, batch_size=1)[0].numpy() if scheme == "tokens" else None
    del tokenizer, text_model
    free_device_memory(device)

    class_ids, totals = sums.class_ids, sums.sums()
    log.info("encoded %d captions into sums of %d classes, shape %s, in %.1f s", len(readable), len(class_ids),
             tuple(totals.shape[1:]), time.perf_counter() - started)
    return EncodedClient(
        class_ids=class_ids,
        counts=sums.counts,
        sums=totals,
        captions=[captions[i] for i in readable],
        paths=[Path(samples[i].path) for i in readable],
        labels=labels[readable],
        unreadable=[samples[i] for i in sorted(run.unreadable)],
        captioned=run.captioned,
        cached=run.cached,
        caption_settings=settings,
        embeddings=sums.embeddings()[0] if keep_embeddings else None,
        empty_prompt=empty_prompt,
    )


def _check_keep_budget(images: int, scheme: str, encoder_id: str) -> None:
    width = text_embedding_dim(scheme, encoder_id)
    per_image = 4 * width * (CLIP_CONTEXT_LENGTH if scheme == "tokens" else 1)
    if images * per_image > KEEP_EMBEDDINGS_MAX_BYTES:
        raise ValueError(
            f"keeping the per-image embeddings of {images} images under scheme {scheme!r} needs "
            f"{images * per_image / 2**30:.1f} GiB (limit {KEEP_EMBEDDINGS_MAX_BYTES / 2**30:.0f} GiB): "
            "turn off what needs them (prototypes, preview) or use fewer images")
