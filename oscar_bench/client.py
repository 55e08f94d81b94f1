"""Client benchmark: the project's captioning stage against the same model's bare ``generate``.

Both run on the same model, batch size, images and device:

* **pipeline**: :func:`oscar_client.captioning.caption_files` exactly as ``encode_client`` runs it at
  the defaults (caption cache on, automatic batch size and DataLoader workers): hash the files, look
  them up, decode + resize + normalise in workers, ``generate``, decode the tokens, store the captions;
* **bare generate**: ``model.generate`` on batches already processed and already on the device, the
  upper bound of what any data path can reach;
* **cache second run**: ``caption_files`` again on the same files, which now generates nothing;
* **start-up**: ``caption_files`` over two batches as a client starts, the captioner loaded from a
  checkpoint on disk while the workers decode: how long the device then waits for its first images.

The timed pipeline passes have the model in memory already; their start-up is the first batch's decoding.
Each pass reports it apart from the steady rate after it, since a long run amortises the one and not the
other.

The model is BLIP-base's architecture (Salesforce/blip-image-captioning-base's published config:
ViT-B/16 at 384 + a BERT-base text decoder, vocabulary 30524) with random weights, built in memory:
nothing is downloaded, and random weights cost the same FLOPs. Random weights rarely emit the end token,
so every caption runs to ``max_new_tokens``: the slowest case, identical on both sides. ``tiny`` uses the
project's tiny BLIP instead (to test the benchmark itself). Images are synthetic 500x375 JPEGs
(smooth random colour fields with grain, about 40 KB, like photos of that size). fp16 on CUDA, fp32 on a
CPU. This module imports neither flwr nor diffusers: it runs on a machine that has only torch and
transformers.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from oscar_bench.timing import timed
from oscar_client.caption_cache import CaptionCache
from oscar_client.captioning import (
    AUTO,
    Captioner,
    caption_files,
    caption_settings,
    resolve_batch_size,
    resolve_num_workers,
)
from oscar_common.models.loading import load_captioner_model, load_captioner_processor

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 30  # the project's caption-max-tokens
IMAGE_SIZE = (500, 375)  # a typical photo (e.g. PASCAL / COCO-sized)


def bench_client(*, tiny: bool, device: torch.device, images: int, budget_seconds: float,
                 batch_size: int = 0, num_workers: int = AUTO, repeats: int = 2) -> dict[str, Any]:
    """Measure the client's captioning stage against bare ``generate``; return the figures.

    ``images`` is an upper bound: after a warm-up batch the count is cut (to whole batches, at least
    one) so that all timed passes fit in about ``budget_seconds``. ``batch_size`` 0 and ``num_workers`` -1
    are the project's automatic choices, as a client at its defaults. The two paths alternate
    ``repeats`` times (bare, pipeline, bare, ...) and the medians are reported, because a launch-bound
    ``generate`` varies between passes by more than the difference being measured (on the H200 machine,
    bare generate at batch 64 took 5.1 to 7.8 s for the same 1,024 images).
    """
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    captioner = Captioner(*_tiny_blip(device, dtype) if tiny else random_blip_base(device, dtype))
    batch = resolve_batch_size(batch_size, captioner, max_new_tokens=MAX_NEW_TOKENS)
    workers = resolve_num_workers(num_workers, device)
    settings = caption_settings("blip-base-random" if not tiny else "tiny-blip", revision="bench", dtype=dtype,
                                max_new_tokens=MAX_NEW_TOKENS)

    with tempfile.TemporaryDirectory(prefix="oscar-bench-client-") as tmp:
        paths = write_photo_jpegs(Path(tmp) / "images", max(images, batch))

        # Warm-up (kernels, allocator), which also sizes the run to the budget: a whole batch on a GPU
        # (its kernels depend on the batch shape), two images on a CPU (where one image takes seconds).
        warm = batch if device.type == "cuda" else min(batch, 2)
        per_image = _bare_seconds([_processed(paths[:warm], captioner).to(device, dtype)], captioner) / warm
        fits = int(budget_seconds / ((2 * repeats + 0.5) * per_image))  # the timed passes + processing
        count = max(batch, min(images, fits) // batch * batch)
        paths = paths[:count]
        log.info("client bench: %d images (of %d asked), batch %d, %d workers, %s %s, warm-up %.3f s/img",
                 count, images, batch, workers, device, dtype, per_image)
        # (b)'s input: batches processed and on the device before the clock starts
        batches = [_processed(paths[i : i + batch], captioner).to(device, dtype) for i in range(0, count, batch)]

        # The model is already in memory, so the pipeline's start-up is the first batch's decoding alone
        # (a client's overlaps its model load: oscar_client.captioning.caption_files).
        loaded = dict(load_processor=lambda: captioner.processor, load_model=lambda: captioner.model)
        bare, pipeline, runs = [], [], []
        for repeat in range(repeats):
            bare.append(_bare_seconds(batches, captioner))  # (b) bare generate
            with CaptionCache.open(Path(tmp) / f"out-{repeat}") as cache:  # (a) a first run: empty cache
                started = time.perf_counter()
                runs.append(caption_files(paths, settings=settings, cache=cache, batch_size=batch,
                                          num_workers=workers, max_new_tokens=MAX_NEW_TOKENS, device=device,
                                          **loaded))
                pipeline.append(time.perf_counter() - started)
        del batches
        startup = _startup(paths[: 2 * batch], captioner, Path(tmp) / "checkpoint", settings=settings,
                           batch_size=batch, num_workers=workers, device=device, bare_batch_s=per_image * batch)
        with CaptionCache.open(Path(tmp) / f"out-{repeats - 1}") as cache:  # (c) the second run
            started = time.perf_counter()
            second = caption_files(paths, settings=settings, cache=cache, batch_size=batch, num_workers=workers,
                                   max_new_tokens=MAX_NEW_TOKENS, device=device, **loaded)
            cache_seconds = time.perf_counter() - started

    pipeline_rate, bare_rate = count / statistics.median(pipeline), count / statistics.median(bare)
    steady = [r.steady_img_per_s for r in runs]  # None where one batch was all there was
    steady_rate = statistics.median(steady) if None not in steady else None
    return {
        "model": "tiny BLIP (random)" if tiny else "BLIP-base architecture (random weights)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "images": count,
        "images_requested": images,
        "batch_size": batch,
        "num_workers": workers,
        "max_new_tokens": MAX_NEW_TOKENS,
        "repeats": repeats,
        "pipeline_img_per_s": round(pipeline_rate, 3),
        "bare_generate_img_per_s": round(bare_rate, 3),
        "pipeline_vs_bare": round(pipeline_rate / bare_rate, 4),
        "pipeline_s": [round(t, 3) for t in pipeline],
        "bare_generate_s": [round(t, 3) for t in bare],
        # start-up and steady state apart: how far the pipeline falls behind over a long run, and why
        "pipeline_first_batch_s": [round(r.first_batch_seconds, 3) for r in runs],
        "pipeline_steady_img_per_s": round(steady_rate, 3) if steady_rate is not None else None,
        "pipeline_steady_vs_bare": round(steady_rate / bare_rate, 4) if steady_rate is not None else None,
        **startup,
        "captioned_first_run": runs[-1].captioned,
        "cache_second_run_s": round(cache_seconds, 3),
        "captioned_second_run": second.captioned,
    }


def _bare_seconds(batches: list[torch.Tensor], captioner: Captioner) -> float:
    """Seconds of ``model.generate`` over processed batches already on the device."""

    @torch.inference_mode()
    def generate_all() -> None:
        for pixel_values in batches:
            captioner.model.generate(pixel_values=pixel_values, max_new_tokens=MAX_NEW_TOKENS)

    return timed(generate_all, captioner.device)[1]


def _startup(paths: list[Path], captioner: Captioner, folder: Path, *, settings: dict[str, Any], batch_size: int,
             num_workers: int, device: torch.device, bare_batch_s: float) -> dict[str, float]:
    """A client's start: ``caption_files`` loading the captioner from a checkpoint on disk (saved from the
    benched model) with the project's loaders, over two batches. How long the model took to load, when the
    first batch was captioned after it, and so how long the device waited for decoded images once the model
    was in (that time less one batch of bare ``generate``)."""
    captioner.model.save_pretrained(folder)
    captioner.processor.save_pretrained(folder)
    load = {}

    def load_model() -> torch.nn.Module:
        load["start"] = time.perf_counter()
        model = load_captioner_model(str(folder), device, captioner.model.dtype)
        load["end"] = time.perf_counter()
        return model

    called = time.perf_counter()  # without a cache, caption_files' own clock starts here too
    run = caption_files(paths, settings=settings, cache=None, batch_size=batch_size, num_workers=num_workers,
                        max_new_tokens=MAX_NEW_TOKENS, device=device,
                        load_processor=lambda: load_captioner_processor(str(folder)), load_model=load_model)
    after_load = called + run.first_batch_seconds - load["end"]
    return {
        "startup_model_load_s": round(load["end"] - load["start"], 3),
        "startup_first_batch_after_load_s": round(after_load, 3),
        "startup_wait_for_images_s": round(max(0.0, after_load - bare_batch_s), 3),
    }


# ---------------------------------------------------------------------- models
def blip_base_config() -> BlipConfig:
    """Salesforce/blip-image-captioning-base's published architecture (config.json)."""
    return BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=512, bos_token_id=30522,
                         sep_token_id=102, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16, layer_norm_eps=1e-5),
        projection_dim=512,
        image_text_hidden_size=256,
    )


def random_blip_base(device: torch.device, dtype: torch.dtype) -> tuple[BlipProcessor, BlipForConditionalGeneration]:
    config = blip_base_config()
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: 250M parameters
        model = BlipForConditionalGeneration(config)
    model.to(dtype).eval().requires_grad_(False)
    # bert-base-uncased's special ids, placeholder words elsewhere (captions of random weights mean nothing)
    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 30522: "[DEC]"}
    vocab = {special.get(i, f"w{i}"): i for i in range(config.text_config.vocab_size)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)  # 384, bicubic, CLIP mean
    return processor, model


def _tiny_blip(device: torch.device, dtype: torch.dtype) -> tuple[BlipProcessor, BlipForConditionalGeneration]:
    from oscar_demo.tiny import save_tiny_captioner  # the test models; only for --tiny

    with tempfile.TemporaryDirectory(prefix="oscar-bench-tiny-") as tmp:
        save_tiny_captioner(Path(tmp))
        processor = BlipProcessor.from_pretrained(tmp)
        model = BlipForConditionalGeneration.from_pretrained(tmp, dtype=dtype)
    return processor, model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------- data
def write_photo_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` JPEGs, written by a thread per CPU (PIL releases the GIL): at the full scale's 2,048 images
    a single thread would spend some 30 s here before anything is timed."""
    folder.mkdir(parents=True)
    width, height = IMAGE_SIZE

    def write(i: int) -> Path:
        rng = np.random.default_rng(i)  # per image: the same files whichever thread writes them
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(IMAGE_SIZE, Image.BICUBIC)
        grain = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        return path

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(write, range(count)))


def _processed(paths: list[Path], captioner: Captioner) -> torch.Tensor:
    """What the image processor makes of the files, all its steps on the CPU: bare generate's input."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return captioner.image_processor(images=images, return_tensors="pt").pixel_values

