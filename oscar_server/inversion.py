"""Hard-prompt inversion: decode pooled CLIP text embeddings back into text prompts (``pooled`` scheme).

Clients upload per-class means of projected, L2-normalised CLIP text embeddings. Stable Diffusion cannot be
conditioned on such a vector, so the server searches, for every mean, a short sequence of real vocabulary
tokens whose CLIP embedding points the same way, with the PEZ method ("Hard Prompts Made Easy", Wen et al.
2023): continuous token embeddings are optimised with AdamW, but the loss is always computed on their
projection onto the nearest vocabulary embeddings, and its gradient is copied back unchanged
(straight-through). All targets are optimised together in one batch.

Candidates are scored by re-encoding their *decoded text* with :func:`oscar_common.text_encoding.encode_pooled`,
because decoded text does not always re-tokenize to the same ids, and the text is what Stable Diffusion sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from oscar_common.logs import progress
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask

from oscar_common.text_encoding import encode_pooled

logger = logging.getLogger(__name__)

# Rows of the [rows, vocab] similarity matrix computed at once (~200 MB in float32 for CLIP's 49k vocab):
# bounds memory when thousands of (client, class) targets are inverted together.
_NN_CHUNK_ROWS = 1024


@dataclass
class InvertedPrompt:
    text: str
    cosine: float  # cosine between the re-encoded text and the (normalised) target


def projected_text_embeds(
    text_model: CLIPTextModelWithProjection, prompt_embeds: torch.Tensor, bos_id: int, eos_id: int
) -> torch.Tensor:
    """CLIP's projected text embedding of ``BOS + prompt + EOS``, given the prompt's token embeddings.

    Mirrors ``CLIPTextModelWithProjection.forward`` but starts from token embeddings ([N, T, E]) so that
    gradients can flow to them. No padding is appended: with the causal mask the EOS hidden state never sees
    later positions, so padding to 77 would only cost compute (the tests check equality with the model's own
    output on 77-padded ids).
    """
    tm = text_model.text_model
    token_embedding = tm.embeddings.token_embedding
    n = prompt_embeds.shape[0]
    ends = token_embedding(torch.tensor([bos_id, eos_id], device=prompt_embeds.device))
    bos = ends[0].expand(n, 1, -1)
    eos = ends[1].expand(n, 1, -1)
    hidden = tm.embeddings(inputs_embeds=torch.cat([bos, prompt_embeds.to(ends.dtype), eos], dim=1))
    # Positional: the fourth parameter (no cache) is `past_key_values` up to transformers 5.17 and `cache` later.
    mask = create_causal_mask(tm.config, hidden, None, None)
    hidden = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    pooled = tm.final_layer_norm(hidden)[:, -1]  # the EOS position
    return text_model.text_projection(pooled)


def _allowed_token_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """Ids the search may pick: everything the tokenizer can decode, minus BOS/EOS/pad and other specials."""
    special = set(tokenizer.all_special_ids)
    limit = min(len(tokenizer), vocab_size)
    return torch.tensor([i for i in range(limit) if i not in special], dtype=torch.long)


def _nearest_tokens(embeds: torch.Tensor, vocab_normed: torch.Tensor, allowed_ids: torch.Tensor) -> torch.Tensor:
    """Nearest vocabulary token (by cosine, as PEZ does) for each row of ``embeds`` [N, T, E] -> ids [N, T]."""
    flat = F.normalize(embeds.reshape(-1, embeds.shape[-1]).float(), dim=-1)
    best = torch.cat([(chunk @ vocab_normed.T).argmax(dim=-1) for chunk in flat.split(_NN_CHUNK_ROWS)])
    return allowed_ids[best].view(embeds.shape[:2])


def invert_embeddings(
    targets: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    text_model: CLIPTextModelWithProjection,
    *,
    num_tokens: int = 16,
    steps: int = 1000,
    lr: float = 0.1,
    weight_decay: float = 0.1,
    seed: int = 0,
    eval_every: int | None = None,
) -> list[InvertedPrompt]:
    """Find, for each target row of ``targets`` [N, D], a ``num_tokens``-token prompt whose CLIP embedding
    is close in cosine. Returns one :class:`InvertedPrompt` per target, in order.

    ``eval_every`` (default ``max(1, steps // 20)``) is how often the current snapped prompts are decoded,
    re-encoded and compared with the best so far; the last step is always evaluated.
    """
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty [N, D] tensor, got shape {tuple(targets.shape)}")
    if steps < 1 or num_tokens < 1:
        raise ValueError(f"steps and num_tokens must be >= 1, got {steps} and {num_tokens}")
    eval_every = eval_every or max(1, steps // 20)
    device = text_model.device
    targets = F.normalize(targets.detach().to(device=device, dtype=torch.float32), dim=-1)
    if targets.shape[1] != text_model.config.projection_dim:
        raise ValueError(f"targets have dim {targets.shape[1]}, the text encoder projects to "
                         f"{text_model.config.projection_dim}: was the same CLIP model used on the clients?")

    weight = text_model.get_input_embeddings().weight
    allowed_ids = _allowed_token_ids(tokenizer, weight.shape[0]).to(device)
    vocab_normed = F.normalize(weight.detach()[allowed_ids].float(), dim=-1)

    n = targets.shape[0]
    generator = torch.Generator().manual_seed(seed)
    init = torch.randint(len(allowed_ids), (n, num_tokens), generator=generator).to(device)
    # The continuous embeddings live in float32 whatever the model dtype: AdamW on fp16 parameters is unstable.
    prompt = weight.detach()[allowed_ids[init]].float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([prompt], lr=lr, weight_decay=weight_decay)

    best_cos = torch.full((n,), -2.0)
    best_text = [""] * n
    requires_grad = [p.requires_grad for p in text_model.parameters()]
    text_model.requires_grad_(False)
    try:
        with torch.enable_grad(), progress(range(steps), desc="prompt inversion", unit="step", logger=logger) as bar:
            for step in bar:
                ids = _nearest_tokens(prompt.detach(), vocab_normed, allowed_ids)
                snapped = weight.detach()[ids].requires_grad_(True)
                out = projected_text_embeds(text_model, snapped, tokenizer.bos_token_id, tokenizer.eos_token_id)
                # Sum, not mean: each target's gradient then does not depend on how many others share the batch.
                loss = (1 - F.cosine_similarity(out.float(), targets, dim=-1)).sum()
                (grad,) = torch.autograd.grad(loss, snapped)
                # Straight-through: the gradient at the snapped point moves the continuous embeddings.
                prompt.grad = grad.float()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                if step % eval_every == 0 or step == steps - 1:
                    # Specials are excluded from the search; keeping them in the decode would expose a bug.
                    texts = tokenizer.batch_decode(ids.cpu().tolist(), skip_special_tokens=False)
                    with torch.no_grad():
                        encoded = encode_pooled(texts, tokenizer, text_model).to(device, torch.float32)
                    cos = (F.normalize(encoded, dim=-1) * targets).sum(-1).cpu()
                    improved = cos > best_cos
                    best_cos = torch.where(improved, cos, best_cos)
                    for i in improved.nonzero().flatten().tolist():
                        best_text[i] = texts[i]
                    bar.set_postfix(loss=f"{loss.item() / n:.4f}", best_cos=f"{best_cos.mean().item():.4f}")
    finally:
        for p, flag in zip(text_model.parameters(), requires_grad):
            p.requires_grad_(flag)

    logger.info("Inverted %d embeddings (%d tokens, %d steps): mean re-encoded cosine %.4f (min %.4f)",
                n, num_tokens, steps, best_cos.mean().item(), best_cos.min().item())
    return [InvertedPrompt(text=t.strip(), cosine=float(c)) for t, c in zip(best_text, best_cos)]
