"""The ``pooled`` scheme's prompts: every upload row decoded into text once, kept in ``prompts.json``.

Each row (a client's mean CLIP embedding of one class, or one of its prototypes) is inverted into a hard
prompt (:mod:`oscar_common.models.inversion`), then put into the prompt template with the class name in words
("aircraft carrier", not the folder name "aircraft_carrier"). The records are the best way for a person
to see what the server learned about each client, and a resumed stage reuses them as they are: inversion
on a GPU is not bit-reproducible.

:func:`invert_targets` is the inversion as the stage runs it (the run config's settings, in chunks sized
by :func:`inversion_chunk`); oscar-bench times the same call.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase

from oscar_common.config import OscarConfig
from oscar_common.devices import free_device_memory
from oscar_common.files import atomic_write_json
from oscar_common.models.inversion import InvertedPrompt, inversion_chunk_size, invert_embeddings
from oscar_common.models.loading import load_clip_text_encoder
from oscar_common.upload_rules import Upload
from oscar_server.stages.synthesis_jobs import UploadRow, prompt_class_name, row_means

log = logging.getLogger(__name__)


def decode_prompts(rows: list[UploadRow], payloads: list[Upload], cfg: OscarConfig, prompts_path: Path,
                   device: torch.device) -> list[dict[str, Any]]:
    """One record per row, aligned with ``rows``: ``client``, ``class_id``, ``class_name``, ``prototype``,
    ``decoded`` (the inverted text), ``cosine`` (of its re-encoding to the mean) and ``prompt`` (what
    Stable Diffusion gets). Reuses ``prompts_path`` when it covers every row, else decodes and writes it."""
    inverted = _saved(prompts_path, rows)
    if inverted is None:
        inverted = _invert(rows, payloads, cfg, device)
        fresh = True
    else:
        fresh = False
    records = []
    for row, decoded in zip(rows, inverted):
        class_name = cfg.class_names[row.class_id]
        records.append({
            "client": row.client, "class_id": row.class_id, "class_name": class_name,
            "prototype": row.prototype, "decoded": decoded.text, "cosine": round(float(decoded.cosine), 4),
            "prompt": cfg.prompt_template.format(class_name=prompt_class_name(class_name), prompt=decoded.text),
        })
    if fresh:
        atomic_write_json(prompts_path, records)
        log.info("decoded %d prompts (mean cosine %.3f); saved to %s", len(records),
                 sum(r["cosine"] for r in records) / max(1, len(records)), prompts_path)
    return records


def _invert(rows: list[UploadRow], payloads: list[Upload], cfg: OscarConfig,
            device: torch.device) -> list[InvertedPrompt]:
    targets = row_means(rows, payloads)
    # Inversion optimises through the encoder: float32 even on GPU, where fp16 gradients underflow.
    tokenizer, text_model = load_clip_text_encoder(cfg.text_encoder, device, torch.float32)
    try:
        return invert_targets(targets, tokenizer, text_model, cfg)
    finally:
        del text_model
        free_device_memory(device)


def invert_targets(targets: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                   text_model: CLIPTextModelWithProjection, cfg: OscarConfig, *,
                   eval_every: int | None = None) -> list[InvertedPrompt]:
    """Hard prompts for ``targets`` [N, D] with the run's ``inversion-*`` settings and seed, in chunks of
    :func:`inversion_chunk` targets; ``eval_every`` as :func:`~oscar_common.models.inversion.invert_embeddings`."""
    return invert_embeddings(targets, tokenizer, text_model, num_tokens=cfg.inversion_tokens,
                             steps=cfg.inversion_steps, lr=cfg.inversion_lr, seed=cfg.seed, eval_every=eval_every,
                             chunk_size=inversion_chunk(len(targets), text_model, cfg))


def inversion_chunk(targets: int, text_model: CLIPTextModelWithProjection, cfg: OscarConfig) -> int:
    """How many of ``targets`` are optimised at once: ``inversion-chunk-size``, or (0) as many as free
    memory allows."""
    return min(targets, cfg.inversion_chunk_size or inversion_chunk_size(text_model, cfg.inversion_tokens))


def _saved(prompts_path: Path, rows: list[UploadRow]) -> list[InvertedPrompt] | None:
    """The saved decodings of ``rows``, or None if ``prompts_path`` is missing or lacks some row."""
    if not prompts_path.exists():
        return None
    # Records written before prototypes existed have no "prototype": they are the class's only row.
    saved = {(r["client"], r["class_id"], r.get("prototype", 0)): r for r in json.loads(prompts_path.read_text())}
    keys = [(row.client, row.class_id, row.prototype) for row in rows]
    if not all(key in saved for key in keys):
        log.info("%s does not cover every upload row: decoding again", prompts_path)
        return None
    log.info("reusing the %d decoded prompts in %s", len(keys), prompts_path)
    return [InvertedPrompt(text=saved[key]["decoded"], cosine=saved[key]["cosine"]) for key in keys]
