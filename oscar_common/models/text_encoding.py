"""The one place text becomes CLIP embeddings, shared by the client (captions) and the server (prompts).

Two encodings, one per conditioning scheme (docs/official-code.md):

* :func:`encode_pooled` (``pooled``): L2-normalised projected CLIP text embeddings, ``[N, D]``
  (D = 512 for openai/clip-vit-base-patch32), the vectors the paper averages and uploads.
* :func:`encode_tokens` (``tokens``): per-token last hidden states of Stable Diffusion's own text encoder,
  ``[N, 77, H]``, computed exactly as ``StableDiffusionPipeline.encode_prompt`` does, so a mean of them can
  be fed back as ``prompt_embeds``.

Both return float32 tensors on the CPU, whatever the model's device and dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: the callers load the models, and importing them here costs seconds
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase


@torch.inference_mode()
def encode_pooled(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    model: CLIPTextModelWithProjection,
    batch_size: int = 64,
) -> torch.Tensor:
    """``[N, D]`` unit-norm ``text_embeds`` (CLIP's projected EOS state) of ``texts``."""
    # The position-embedding table is the hard limit (77 for CLIP); longer captions are cut, as in CLIP.
    max_length = model.config.max_position_embeddings
    chunks = [torch.empty(0, model.config.projection_dim)]
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(model.device)
        embeds = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).text_embeds
        chunks.append(F.normalize(embeds.float(), dim=-1).cpu())
    return torch.cat(chunks)


@torch.inference_mode()
def encode_tokens(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: CLIPTextModel,
    batch_size: int = 64,
) -> torch.Tensor:
    """``[N, 77, H]`` last hidden states, padded to the tokenizer's max length like SD's prompt encoding."""
    max_length = tokenizer.model_max_length
    chunks = [torch.empty(0, max_length, text_encoder.config.hidden_size)]
    # SD 1.x text encoders do not use the attention mask (padding tokens attend causally); follow the config.
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding="max_length", truncation=True,
                          max_length=max_length, return_tensors="pt").to(text_encoder.device)
        mask = batch.attention_mask if use_mask else None
        hidden = text_encoder(input_ids=batch.input_ids, attention_mask=mask).last_hidden_state
        chunks.append(hidden.float().cpu())
    return torch.cat(chunks)
