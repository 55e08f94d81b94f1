"""Hard-prompt inversion of pooled CLIP embeddings, on the tiny CLIP (oscar_demo.tiny: projection 512,
real 49408-token BPE vocabulary)."""

from __future__ import annotations

import pytest
import torch

from oscar_common.models import load_clip_text_encoder
from oscar_common.text_encoding import encode_pooled
from oscar_demo.tiny import save_tiny_clip
from oscar_server.inversion import invert_embeddings, projected_text_embeds

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
    full = torch.full((4, 77), tokenizer.pad_token_id)  # what the tokenizer feeds the model: padded to 77
    full[:, 0] = tokenizer.bos_token_id
    full[:, 1 : PROMPT_TOKENS + 1] = ids
    full[:, PROMPT_TOKENS + 1] = tokenizer.eos_token_id
    with torch.no_grad():
        expected = model(input_ids=full).text_embeds
        got = projected_text_embeds(model, model.get_input_embeddings()(ids), tokenizer.bos_token_id,
                                    tokenizer.eos_token_id)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Also for real text through the tokenizer (same ids the client-side encoder sees).
    enc = tokenizer(["a photo of a cat on a red sofa"], return_tensors="pt")
    with torch.no_grad():
        got = projected_text_embeds(model, model.get_input_embeddings()(enc.input_ids[:, 1:-1]),
                                    tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.testing.assert_close(torch.nn.functional.normalize(got, dim=-1),
                               encode_pooled(["a photo of a cat on a red sofa"], tokenizer, model),
                               atol=1e-5, rtol=1e-5)


def test_inversion_beats_random_prompts(clip):
    tokenizer, model = clip
    targets = encode_pooled(_random_prompts(tokenizer, 4, seed=2), tokenizer, model)
    random_mean = (encode_pooled(_random_prompts(tokenizer, 50, seed=3), tokenizer, model) @ targets.T).mean()

    flags = [p.requires_grad for p in model.parameters()]
    results = invert_embeddings(targets, tokenizer, model, num_tokens=PROMPT_TOKENS, steps=100, seed=0)

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
    run = lambda seed: invert_embeddings(targets, tokenizer, model, num_tokens=4, steps=12, seed=seed, eval_every=4)
    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert [r.text for r in first] != [r.text for r in other]


def test_rejects_targets_of_the_wrong_dimension(clip):
    tokenizer, model = clip
    with pytest.raises(ValueError, match="projects to 512"):
        invert_embeddings(torch.randn(2, 768), tokenizer, model, steps=1)
