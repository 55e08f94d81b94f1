"""Hard-prompt inversion of pooled CLIP embeddings, on the tiny CLIP (oscar_demo.tiny: projection 512,
real 49408-token BPE vocabulary)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

import oscar_common.models.inversion as inversion
from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH
from oscar_common.models.inversion import (
    CPU_CHUNK_SIZE,
    end_token_embeds,
    inversion_chunk_size,
    invert_embeddings,
    projected_text_embeds,
)
from oscar_common.models.loading import load_clip_text_encoder
from oscar_common.models.text_encoding import encode_pooled
from oscar_demo.tiny import save_tiny_clip

PROMPT_TOKENS = 8


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    model_dir = save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return load_clip_text_encoder(str(model_dir), torch.device("cpu"), torch.float32)


def _random_ids(tokenizer, n: int, seed: int) -> torch.Tensor:
    """Random ordinary (non-special) token ids, [n, PROMPT_TOKENS]."""
    ids = torch.randint(0, len(tokenizer), (n, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))
    special = torch.tensor(tokenizer.all_special_ids)
    return torch.where(torch.isin(ids, special), torch.zeros_like(ids), ids)


def _random_prompts(tokenizer, n: int, seed: int) -> list[str]:
    return tokenizer.batch_decode(_random_ids(tokenizer, n, seed).tolist())


def test_custom_forward_matches_model_output(clip):
    """Guards the hand-written forward against changes in transformers' CLIP implementation."""
    tokenizer, model = clip
    ids = _random_ids(tokenizer, 4, seed=1)
    full = torch.full((4, CLIP_CONTEXT_LENGTH), tokenizer.pad_token_id)  # what the tokenizer feeds the model
    full[:, 0] = tokenizer.bos_token_id
    full[:, 1 : PROMPT_TOKENS + 1] = ids
    full[:, PROMPT_TOKENS + 1] = tokenizer.eos_token_id
    with torch.no_grad():
        expected = model(input_ids=full).text_embeds
        ends = end_token_embeds(model, tokenizer.bos_token_id, tokenizer.eos_token_id)
        got = projected_text_embeds(model, model.get_input_embeddings()(ids), ends)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Also for real text through the tokenizer (same ids the client-side encoder sees).
    enc = tokenizer(["a photo of a cat on a red sofa"], return_tensors="pt")
    with torch.no_grad():
        got = projected_text_embeds(model, model.get_input_embeddings()(enc.input_ids[:, 1:-1]), ends)
    torch.testing.assert_close(torch.nn.functional.normalize(got, dim=-1),
                               encode_pooled(["a photo of a cat on a red sofa"], tokenizer, model),
                               atol=1e-5, rtol=1e-5)


def test_inversion_beats_random_prompts(clip):
    tokenizer, model = clip
    targets = encode_pooled(_random_prompts(tokenizer, 4, seed=2), tokenizer, model)
    random_mean = (encode_pooled(_random_prompts(tokenizer, 50, seed=3), tokenizer, model) @ targets.T).mean()

    flags = [p.requires_grad for p in model.parameters()]
    results = invert_embeddings(targets, tokenizer, model, num_tokens=PROMPT_TOKENS, steps=100, lr=0.1, seed=0,
                                chunk_size=0)

    assert len(results) == 4
    cosines = torch.tensor([r.cosine for r in results])
    # Measured on the tiny CLIP: random prompts ~0.41, inverted 0.97-0.98.
    assert cosines.min() > random_mean + 0.3, (cosines, random_mean)
    # The reported cosine is that of the returned text re-encoded, i.e. what Stable Diffusion will see.
    reencoded = (encode_pooled([r.text for r in results], tokenizer, model) * targets).sum(-1)
    torch.testing.assert_close(reencoded, cosines, atol=1e-4, rtol=0)
    assert not any("<|" in r.text for r in results)  # BOS/EOS/pad are never picked
    # The encoder stays frozen and clean.
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_inversion_is_deterministic_given_seed(clip):
    tokenizer, model = clip
    # Means of normalised embeddings, not unit length: the inversion must normalise them itself.
    targets = encode_pooled(_random_prompts(tokenizer, 6, seed=4), tokenizer, model).view(3, 2, -1).mean(1)
    run = lambda seed: invert_embeddings(targets, tokenizer, model, num_tokens=4, steps=12, lr=0.1, seed=seed,
                                         chunk_size=0, eval_every=4)
    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert [r.text for r in first] != [r.text for r in other]


def test_rejects_targets_of_the_wrong_dimension(clip):
    tokenizer, model = clip
    with pytest.raises(ValueError, match="projects to 512"):
        invert_embeddings(torch.randn(2, 768), tokenizer, model, num_tokens=4, steps=1, lr=0.1, seed=0, chunk_size=0)


def test_chunked_inversion_gives_the_results_of_one_batch(clip):
    """Chunks of 1, 3 and all 7 targets: the same prompts, and the same cosines up to the float rounding
    of batched matmuls (a CPU GEMM's last bit depends on how many rows it multiplies at once)."""
    tokenizer, model = clip
    targets = encode_pooled(_random_prompts(tokenizer, 7, seed=5), tokenizer, model)
    runs = {size: invert_embeddings(targets, tokenizer, model, num_tokens=4, steps=15, lr=0.1, seed=0,
                                    chunk_size=size, eval_every=3) for size in (1, 3, 7)}
    texts = {size: [r.text for r in results] for size, results in runs.items()}
    assert texts[1] == texts[3] == texts[7]
    assert len(set(texts[7])) == 7  # seven different prompts: the chunks did not all start alike
    for size in (1, 3):
        torch.testing.assert_close(torch.tensor([r.cosine for r in runs[size]]),
                                   torch.tensor([r.cosine for r in runs[7]]), atol=1e-5, rtol=0)


def test_chunk_size_from_free_gpu_memory(clip, monkeypatch):
    _, model = clip
    assert inversion_chunk_size(model, 16) == CPU_CHUNK_SIZE  # on CPU: fixed
    gpu_model = lambda hidden: SimpleNamespace(device=torch.device("cuda", 0),
                                               config=SimpleNamespace(hidden_size=hidden, num_hidden_layers=12))
    free = {"bytes": 130e9}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free["bytes"]), int(141e9)))
    # An idle H200: all 540 DomainNet means (6 clients x 90 classes) in one chunk, using half the memory.
    assert inversion_chunk_size(gpu_model(512), 16) == 4443
    free["bytes"] = 8e9
    assert inversion_chunk_size(gpu_model(512), 16) == 273
    assert inversion_chunk_size(gpu_model(768), 8) == 328  # wider tower, shorter prompts
    free["bytes"] = 1e6
    assert inversion_chunk_size(gpu_model(512), 16) == 1


def test_automatic_chunks_give_the_results_of_one_batch(clip, monkeypatch, caplog):
    """chunk_size 0 (the run config's default) takes the size inversion_chunk_size chooses, as on a GPU
    whose free memory holds only a few targets: forced here to 2, so 5 targets run in 3 chunks."""
    tokenizer, model = clip
    targets = encode_pooled(_random_prompts(tokenizer, 5, seed=8), tokenizer, model)
    settings = dict(num_tokens=4, steps=6, lr=0.1, seed=0, eval_every=2)
    whole = invert_embeddings(targets, tokenizer, model, chunk_size=5, **settings)
    monkeypatch.setattr(inversion, "inversion_chunk_size", lambda text_model, num_tokens: 2)
    with caplog.at_level("INFO", logger=inversion.__name__):
        chunked = invert_embeddings(targets, tokenizer, model, chunk_size=0, **settings)
    assert "Inverting 5 embeddings in 3 chunks of up to 2" in caplog.text
    assert [r.text for r in chunked] == [r.text for r in whole]
    torch.testing.assert_close(torch.tensor([r.cosine for r in chunked]), torch.tensor([r.cosine for r in whole]),
                               atol=1e-5, rtol=0)


def test_no_tensor_is_built_from_host_values_in_the_step_loop(clip, monkeypatch):
    """On a GPU, torch.tensor(..., device=cuda) in the step loop is a blocking copy every step, which keeps
    the CPU from queueing ahead. Tensors the inversion code builds from Python values must not grow with
    the number of steps."""
    tokenizer, model = clip
    targets = encode_pooled(_random_prompts(tokenizer, 2, seed=9), tokenizer, model)
    built = []
    real_tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename == inversion.__file__:
            built.append(sys._getframe(1).f_code.co_name)
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    counts = []
    for steps in (2, 8):
        built.clear()
        invert_embeddings(targets, tokenizer, model, num_tokens=4, steps=steps, lr=0.1, seed=0, chunk_size=2,
                          eval_every=100)
        counts.append(len(built))
    assert counts[0] == counts[1], f"tensors built per step in {built}"
