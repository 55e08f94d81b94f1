"""Hard-prompt inversion: decode pooled CLIP text embeddings back into text prompts (``pooled`` scheme).

Clients upload per-class means of projected, L2-normalised CLIP text embeddings. Stable Diffusion cannot be
conditioned on such a vector, so the server searches, for every mean, a short sequence of real vocabulary
tokens whose CLIP embedding points the same way, with the PEZ method ("Hard Prompts Made Easy", Wen et al.
2023): continuous token embeddings are optimised with AdamW, but the loss is always computed on their
projection onto the nearest vocabulary embeddings, and its gradient is copied back unchanged
(straight-through).

Targets are optimised in chunks whose size fits free GPU memory. The loss is a sum of per-target terms and
AdamW updates each element on its own, so a target's result does not depend on which others share its
chunk: the random initial tokens of all targets are drawn first, then the chunks run one after another,
and any chunk size gives the results of one batch (tests check sizes 1, 3 and all: the same prompts, and
cosines equal up to the last float bits, which batched matmuls round differently for other row counts).

Candidates are scored by re-encoding their *decoded text* with :func:`oscar_common.models.text_encoding.encode_pooled`,
because decoded text does not always re-tokenize to the same ids, and the text is what Stable Diffusion sees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask

from oscar_common.logs import progress
from oscar_common.models.text_encoding import encode_pooled

logger = logging.getLogger(__name__)

# Rows of the [rows, vocab] similarity matrix computed at once (~200 MB in float32 for CLIP's 49k vocab):
# bounds memory when thousands of (client, class) targets are inverted together.
_NN_CHUNK_ROWS = 1024
CPU_CHUNK_SIZE = 256  # targets at once on CPU (~7 MB each with CLIP ViT-B/32 and 16 tokens)
# Measured on an H200: 540 targets x 16 tokens through CLIP ViT-B/32's text tower (12 layers of 512) in
# float32 peaked at 7.9 GB, model included: ~15 MB per target, scaled below by tokens and tower size.
_BYTES_PER_TARGET = 7.9e9 / 540


@dataclass
class InvertedPrompt:
    text: str
    cosine: float  # cosine between the re-encoded text and the (normalised) target


def end_token_embeds(text_model: CLIPTextModelWithProjection, bos_id: int, eos_id: int) -> torch.Tensor:
    """The token embeddings of BOS and EOS, [2, E], on the model's device: computed once per search, because
    building the id tensor on a GPU every step is a blocking host-to-device copy that stalls the queue."""
    ids = torch.tensor([bos_id, eos_id], device=text_model.device)
    return text_model.text_model.embeddings.token_embedding(ids).detach()


def projected_text_embeds(
    text_model: CLIPTextModelWithProjection, prompt_embeds: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """CLIP's projected text embedding of ``BOS + prompt + EOS``, given the prompt's token embeddings and
    those of BOS and EOS (``ends`` [2, E], from :func:`end_token_embeds`).

    Mirrors ``CLIPTextModelWithProjection.forward`` but starts from token embeddings ([N, T, E]) so that
    gradients can flow to them. No padding is appended: with the causal mask the EOS hidden state never sees
    later positions, so padding to 77 would only cost compute (the tests check equality with the model's own
    output on 77-padded ids).
    """
    tm = text_model.text_model
    n = prompt_embeds.shape[0]
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


def inversion_chunk_size(text_model: CLIPTextModelWithProjection, num_tokens: int) -> int:
    """How many targets to optimise at once: half the free memory on CUDA, :data:`CPU_CHUNK_SIZE` elsewhere."""
    if text_model.device.type != "cuda":
        return CPU_CHUNK_SIZE
    free, _ = torch.cuda.mem_get_info(text_model.device)
    config = text_model.config
    per_target = (_BYTES_PER_TARGET * (num_tokens + 2) / 18
                  * config.hidden_size * config.num_hidden_layers / (512 * 12))
    return max(1, int(0.5 * free / per_target))


def invert_embeddings(
    targets: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    text_model: CLIPTextModelWithProjection,
    *,
    num_tokens: int,
    steps: int,
    lr: float,
    seed: int,
    chunk_size: int = 0,
    weight_decay: float = 0.1,
    eval_every: int | None = None,
) -> list[InvertedPrompt]:
    """Find, for each target row of ``targets`` [N, D], a ``num_tokens``-token prompt whose CLIP embedding
    is close in cosine. Returns one :class:`InvertedPrompt` per target, in order.

    ``chunk_size`` targets are optimised at once (0: :func:`inversion_chunk_size`); the results do not
    depend on it. ``eval_every`` (default ``max(1, steps // 20)``) is how often the current snapped prompts
    are decoded, re-encoded and compared with the best so far; the last step is always evaluated.
    """
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty [N, D] tensor, got shape {tuple(targets.shape)}")
    if steps < 1 or num_tokens < 1:
        raise ValueError(f"steps and num_tokens must be >= 1, got {steps} and {num_tokens}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: from free memory), got {chunk_size}")
    device = text_model.device
    targets = F.normalize(targets.detach().to(device=device, dtype=torch.float32), dim=-1)
    if targets.shape[1] != text_model.config.projection_dim:
        raise ValueError(f"targets have dim {targets.shape[1]}, the text encoder projects to "
                         f"{text_model.config.projection_dim}: was the same CLIP model used on the clients?")

    search = _TokenSearch(tokenizer, text_model, lr=lr, weight_decay=weight_decay,
                          eval_every=eval_every or max(1, steps // 20))
    n = targets.shape[0]
    # All initial tokens first, from one generator: a target's start does not depend on its chunk.
    generator = torch.Generator().manual_seed(seed)
    init = torch.randint(len(search.allowed_ids), (n, num_tokens), generator=generator).to(device)
    chunk_size = min(n, chunk_size or inversion_chunk_size(text_model, num_tokens))
    chunks = range(0, n, chunk_size)
    if len(chunks) > 1:
        logger.info("Inverting %d embeddings in %d chunks of up to %d", n, len(chunks), chunk_size)

    results: list[InvertedPrompt] = []
    requires_grad = [p.requires_grad for p in text_model.parameters()]
    text_model.requires_grad_(False)
    try:
        with progress(total=steps * len(chunks), desc="prompt inversion", unit="step", logger=logger) as bar:
            for start in chunks:
                results += search.run(targets[start : start + chunk_size], init[start : start + chunk_size],
                                      steps=steps, bar=bar)
    finally:
        for p, flag in zip(text_model.parameters(), requires_grad):
            p.requires_grad_(flag)

    cosines = torch.tensor([r.cosine for r in results])
    logger.info("Inverted %d embeddings (%d tokens, %d steps): mean re-encoded cosine %.4f (min %.4f)",
                n, num_tokens, steps, cosines.mean().item(), cosines.min().item())
    return results


class _TokenSearch:
    """PEZ over one chunk of targets at a time, with what all chunks share (vocabulary, settings)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_model: CLIPTextModelWithProjection, *,
                 lr: float, weight_decay: float, eval_every: int) -> None:
        self.tokenizer, self.text_model = tokenizer, text_model
        self.lr, self.weight_decay, self.eval_every = lr, weight_decay, eval_every
        self.weight = text_model.get_input_embeddings().weight.detach()
        self.allowed_ids = _allowed_token_ids(tokenizer, self.weight.shape[0]).to(text_model.device)
        self.vocab_normed = F.normalize(self.weight[self.allowed_ids].float(), dim=-1)
        self.ends = end_token_embeds(text_model, tokenizer.bos_token_id, tokenizer.eos_token_id)

    def run(self, targets: torch.Tensor, init: torch.Tensor, *, steps: int, bar: Any) -> list[InvertedPrompt]:
        """Optimise prompts for ``targets`` [n, D] (unit rows) from the initial token indices ``init`` [n, T]."""
        tokenizer, weight = self.tokenizer, self.weight
        n = targets.shape[0]
        # The continuous embeddings live in float32 whatever the model dtype: AdamW on fp16 parameters is unstable.
        prompt = weight[self.allowed_ids[init]].float().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([prompt], lr=self.lr, weight_decay=self.weight_decay)
        best_cos = torch.full((n,), -2.0)
        best_text = [""] * n
        with torch.enable_grad():
            for step in range(steps):
                ids = _nearest_tokens(prompt.detach(), self.vocab_normed, self.allowed_ids)
                snapped = weight[ids].requires_grad_(True)
                out = projected_text_embeds(self.text_model, snapped, self.ends)
                # Sum, not mean: each target's gradient then does not depend on how many others share the batch.
                loss = (1 - F.cosine_similarity(out.float(), targets, dim=-1)).sum()
                (grad,) = torch.autograd.grad(loss, snapped)
                # Straight-through: the gradient at the snapped point moves the continuous embeddings.
                prompt.grad = grad.float()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                if step % self.eval_every == 0 or step == steps - 1:
                    # Specials are excluded from the search; keeping them in the decode would expose a bug.
                    texts = tokenizer.batch_decode(ids.cpu().tolist(), skip_special_tokens=False)
                    with torch.no_grad():
                        encoded = encode_pooled(texts, tokenizer, self.text_model).to(targets.device, torch.float32)
                    cos = (F.normalize(encoded, dim=-1) * targets).sum(-1).cpu()
                    improved = cos > best_cos
                    best_cos = torch.where(improved, cos, best_cos)
                    for i in improved.nonzero().flatten().tolist():
                        best_text[i] = texts[i]
                    bar.set_postfix(loss=f"{loss.item() / n:.4f}", best_cos=f"{best_cos.mean().item():.4f}")
                bar.update(1)
        return [InvertedPrompt(text=t.strip(), cosine=float(c)) for t, c in zip(best_text, best_cos)]
