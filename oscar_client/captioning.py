"""Images on disk -> captions, streamed: DataLoader workers decode while the captioner generates.

:func:`caption_files` is the whole stage as a client runs it: captions already in the caption cache are
taken from it, the rest are generated batch by batch and stored as they come.

Each worker opens an image, converts it to RGB and runs the captioner's image processor up to the resize,
so decoding and resizing overlap with ``generate`` on the main process, and memory holds a few batches
whatever the size of the data set: about two batches wait in the loader's queue (at least two chunks per
worker) next to the batch being assembled and captioned. The processor's last, per-pixel steps (rescale to
[0, 1] and normalise with its mean and std) run on the model's device instead: the workers then hand over
uint8 images, a quarter of float32's bytes through shared memory and the host-to-device copy
(measured on an H200, batch 64, 4 workers: the first batch arrived in 0.43 s instead of 1.66 s).
An image that cannot be read or decoded is skipped with its reason, never a crash.

Captioners: BLIP (unconditional, as the paper) and BLIP-2 (what the official OSCAR code runs). BLIP-2's
language model sees the image through ``num_query_tokens`` ``<image>`` placeholder tokens followed by a
text prompt: the run's ``blip2-prompt``, by default ``"a photo of"``, the prompt of the model type the
official code loads (LAVIS ``caption_coco_flant5xl``; its FlanT5 encoder then sees the query outputs and
"a photo of</s>"). The caption is what the language model writes after the prompt. The official OSCAR
code samples (nucleus); we decode as the checkpoint's generation config says (greedy for BLIP-base), with
``max_new_tokens`` on top.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from oscar_client.caption_cache import CaptionCache, file_digests
from oscar_common.data.local import UNREADABLE, open_rgb
from oscar_common.devices import free_device_memory
from oscar_common.logs import progress
from oscar_common.models.loading import captioner_type

log = logging.getLogger(__name__)

AUTO = -1  # num_workers: choose for the device
CPU_BATCH_SIZE = 8  # batch_size 0 on a CPU: generate is compute-bound there, larger batches gain little
# batch_size 0 on CUDA: the cap of what free memory allows. BLIP-base's generate is bound by kernel launches
# at these sizes (measured on an H200, fp16: bare generate 131-220 img/s at batch 64, 305-361 at 128), and
# 4 workers still feed 128 (oscar_bench.client); larger batches hold more images in host memory.
MAX_AUTO_BATCH_SIZE = 128
LOADER_CHUNK = 16  # images a DataLoader worker decodes per item; batches are assembled from these chunks
AUTO_MEMORY_FRACTION = 0.5  # share of free GPU memory an automatic batch may plan to use
_NAMED_UNREADABLE = 10  # how many unreadable files the summary line names


def caption_settings(captioner_id: str, *, revision: str, dtype: torch.dtype, max_new_tokens: int,
                     prompt: str = "") -> dict[str, Any]:
    """Everything that changes a caption besides the image: the key of cached captions, and what
    :func:`caption_files` captions with.

    ``prompt``: BLIP-2's text prompt (:func:`captioner_prompt`); BLIP takes none.

    ``revision`` is the checkpoint's (``oscar_common.models.loading.checkpoint_revision``): it covers the weights,
    the processor and the generation config. The device is left out on purpose: the same weights and
    dtype give the same greedy captions on any device up to rare floating-point ties.
    """
    return {"captioner": captioner_id, "revision": revision, "dtype": str(dtype).removeprefix("torch."),
            "max_new_tokens": int(max_new_tokens), "prompt": prompt}


def captioner_prompt(captioner_id: str, blip2_prompt: str) -> str:
    """The text prompt a captioner is given: ``blip2_prompt`` for a BLIP-2, none for BLIP (the model type is
    read from the checkpoint's config, without loading weights)."""
    return blip2_prompt if captioner_type(captioner_id) == "blip-2" else ""


class Captioner:
    """A loaded captioner (processor + model) that turns a batch of processed images into caption strings.

    ``prompt``: the text a BLIP-2 continues (BLIP captions unconditionally: only "" is accepted)."""

    def __init__(self, processor: Any, model: torch.nn.Module, *, prompt: str = "") -> None:
        self.processor = processor
        self.model = model
        self.prompt = _prompt_inputs(processor, model, prompt)
        # A BLIP-2 with a decoder-only language model (OPT) returns its input before the new tokens: keep these.
        decoder_only = bool(self.prompt) and not model.config.text_config.is_encoder_decoder
        self.input_length = self.prompt["input_ids"].shape[1] if decoder_only else 0

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, *, max_new_tokens: int) -> list[str]:
        """Captions of resized images ``[B, 3, H, W]`` as :class:`CaptionInputs` gives them (uint8)."""
        pixel_values = self.normalize(pixel_values.to(self.model.device))
        prompt = {name: ids.to(self.model.device).expand(len(pixel_values), -1) for name, ids in self.prompt.items()}
        output_ids = self.model.generate(pixel_values=pixel_values, **prompt, max_new_tokens=max_new_tokens)
        output_ids = output_ids[:, self.input_length:]
        return [text.strip() for text in self.processor.batch_decode(output_ids, skip_special_tokens=True)]


    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The image processor's rescale and normalise steps, on the images' device, in the model's dtype."""
        processor = self.image_processor
        pixels = images.float()
        if processor.do_rescale:
            pixels = pixels * processor.rescale_factor
        if processor.do_normalize:
            mean = torch.tensor(processor.image_mean, device=pixels.device).view(1, -1, 1, 1)
            std = torch.tensor(processor.image_std, device=pixels.device).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.to(self.model.dtype)


def _prompt_inputs(processor: Any, model: torch.nn.Module, prompt: str) -> dict[str, torch.Tensor]:
    """The constant text inputs of one image: none for BLIP; ``<image>`` x num_query_tokens + prompt for BLIP-2."""
    if model.config.model_type != "blip-2":
        if prompt:
            raise ValueError(f"BLIP captions without a text prompt here; got {prompt!r} (blip2-prompt applies to "
                             "BLIP-2 captioners only)")
        return {}
    # The processor places the image tokens (it knows how many); a blank image stands in for the real ones.
    inputs = processor(images=Image.new("RGB", (8, 8)), text=prompt, return_tensors="pt")
    image_tokens = int((inputs.input_ids == model.config.image_token_id).sum())
    if image_tokens != model.config.num_query_tokens:
        raise ValueError(
            f"this BLIP-2 checkpoint's processor puts {image_tokens} image tokens before the prompt but the model "
            f"has {model.config.num_query_tokens} query tokens: the processor config predates transformers' "
            "image-token handling (no num_query_tokens). Use a current checkpoint revision or set "
            "num_query_tokens in its processor_config.json.")
    return {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}


# ---------------------------------------------------------------------- the data side (runs in workers)
@dataclass
class InputBatch:
    indices: list[int]  # positions (in the paths given) of the images in pixel_values
    pixel_values: torch.Tensor | None  # [B, 3, H, W] uint8 (resized), None when no image of the batch was readable
    unreadable: list[tuple[int, str]]  # (position, reason)


class CaptionInputs(Dataset):
    """Item ``i``: ``(i, resized image [3, H, W] uint8 or None, reason or None)`` for ``paths[i]``.

    The image processor runs with rescale and normalise off; :meth:`Captioner.normalize` does them.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], image_processor: Any) -> None:
        self.paths = [Path(p) for p in paths]
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            rgb = open_rgb(self.paths[index])  # the full decode: a truncated file fails here
            pixel_values = self.image_processor(images=rgb, do_rescale=False, do_normalize=False,
                                                return_tensors="pt").pixel_values[0]
        except UNREADABLE as exc:
            return index, None, f"{type(exc).__name__}: {exc}"
        return index, pixel_values, None


def collate_inputs(items: list[tuple[int, torch.Tensor | None, str | None]]) -> InputBatch:
    readable = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    return InputBatch(
        indices=[index for index, _ in readable],
        pixel_values=torch.stack([pixels for _, pixels in readable]) if readable else None,
        unreadable=[(index, reason) for index, pixels, reason in items if pixels is None],
    )


def input_loader(paths: Sequence[str | os.PathLike[str]], image_processor: Any, *, chunk_size: int,
                 num_workers: int, ahead: int) -> DataLoader:
    """Chunks of resized images in input order (``num_workers`` 0: decoded on the calling thread), the
    workers keeping about ``ahead`` images decoded in advance (in chunks; at least two per worker).

    No pinned memory: on an H200 pinning (an extra copy in a thread of the main process, next to a
    launch-bound generate) made steady captioning slower, 257-270 img/s against 284-337 without.
    """
    extra = {}
    if num_workers > 0:
        extra["prefetch_factor"] = max(2, -(-ahead // (chunk_size * num_workers)))
    return DataLoader(CaptionInputs(paths, image_processor), batch_size=chunk_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_inputs, **extra)


# ---------------------------------------------------------------------- the loop
@dataclass
class CaptionedBatch:
    indices: list[int]  # positions (in the paths given) of the captioned images
    captions: list[str]
    unreadable: list[tuple[int, str]]  # (position, reason)


def decoded_chunks(paths: Sequence[str | os.PathLike[str]], image_processor: Any, *, batch_size: int,
                   num_workers: int) -> Iterator[InputBatch]:
    """Start decoding ``paths`` now: chunks of at most :data:`LOADER_CHUNK` resized images, in input order.

    The workers start at once and keep about two batches of ``batch_size`` decoded ahead: while the GPU
    captions one batch they must be able to finish the next (with only two chunks each, they stopped after
    64 images). A client calls this before its captioner's weights load, so the first batch is decoded
    while they do.
    """
    loader = input_loader(paths, image_processor, chunk_size=min(batch_size, LOADER_CHUNK), num_workers=num_workers,
                          ahead=2 * batch_size)
    return iter(loader)  # the iterator forks the workers, which fill their queues right away


def caption_batches(chunks: Iterator[InputBatch], captioner: Captioner, *, batch_size: int,
                    max_new_tokens: int) -> Iterator[CaptionedBatch]:
    """Caption decoded ``chunks`` (:func:`decoded_chunks`) in order, ``batch_size`` images per ``generate``.

    A DataLoader hands each worker whole items, so with the batch as the item the first ``generate``
    waited for one worker to decode a whole batch alone (128 images x ~5 ms: over half a second of an idle
    GPU at every start); with chunks, all the workers fill the first batch together.
    """
    indices: list[int] = []  # of the images in `pending`, in order
    pending: list[torch.Tensor] = []  # decoded chunks, already on the model's device
    unreadable: list[tuple[int, str]] = []

    def caption(count: int) -> CaptionedBatch:
        """Caption the first ``count`` pending images; the rest stay pending."""
        stacked = torch.cat(pending) if pending else torch.empty(0)
        pending.clear()  # the chunks are copied into `stacked`: free them before generate runs
        if len(stacked) > count:
            pending.append(stacked[count:].clone())
        captions = captioner.generate(stacked[:count], max_new_tokens=max_new_tokens) if count else []
        done = CaptionedBatch(indices[:count], captions, unreadable.copy())
        del indices[:count]
        unreadable.clear()
        return done

    for part in chunks:
        unreadable += part.unreadable
        if part.pixel_values is not None:
            indices += part.indices
            pending.append(part.pixel_values.to(captioner.device))
        while len(indices) >= batch_size:
            yield caption(batch_size)
    if indices or unreadable:
        yield caption(len(indices))


@dataclass
class CaptionRun:
    captions: list[str | None]  # one per path; None where the image could not be read
    unreadable: dict[int, str]  # position -> reason
    captioned: int  # generated in this run
    cached: int  # taken from the cache
    batch_size: int | None = None  # as resolved, when anything was generated
    num_workers: int | None = None
    seconds: float | None = None  # captioning, from loading the captioner to the last caption
    first_batch_seconds: float | None = None  # from the same start to the first captioned batch
    first_batch_images: int = 0

    @property
    def steady_img_per_s(self) -> float | None:
        """Images per second after the first batch: the rate once start-up (model load, the first batch's
        decoding) is behind, which a long run approaches."""
        if (self.seconds is None or self.first_batch_seconds is None or self.captioned <= self.first_batch_images
                or self.seconds <= self.first_batch_seconds):
            return None  # nothing after the first batch
        return (self.captioned - self.first_batch_images) / (self.seconds - self.first_batch_seconds)


def caption_files(
    paths: Sequence[str | os.PathLike[str]],
    *,
    settings: dict[str, Any],
    load_processor: Callable[[], Any],
    load_model: Callable[[], torch.nn.Module],
    cache: CaptionCache | None,
    batch_size: int,
    num_workers: int,
    max_new_tokens: int,
    device: torch.device,
) -> CaptionRun:
    """Caption every image file, reusing ``cache`` (keyed by ``settings``, see :func:`caption_settings`).

    The captioner is loaded only when something is left to caption (a second run does not even load the
    model), in two steps: its processor, which the decoding workers need and which they start with, then
    its weights, which load while the workers decode the first batches. The captioner is dropped before
    returning. Unreadable images are skipped and named in the log, and remembered by the cache so that a
    later run skips them without loading the captioner.
    """
    # 1. What the cache knows: captions, and images that could not be decoded
    captions: list[str | None] = [None] * len(paths)
    digests: list[str | None] = [None] * len(paths)
    known_unreadable: list[str | None] = [None] * len(paths)
    if cache is not None:
        digests = file_digests(paths, threads=min(8, os.cpu_count() or 1))
        captions = cache.lookup(settings, digests)
        known_unreadable = cache.lookup_unreadable(digests)
    cached = sum(c is not None for c in captions)
    unreadable: dict[int, str] = {}
    todo: list[int] = []
    for i, caption in enumerate(captions):
        if caption is not None:
            continue
        if cache is not None and digests[i] is None:
            unreadable[i] = "the file cannot be opened or read"
        elif known_unreadable[i] is not None:
            unreadable[i] = f"{known_unreadable[i]} (known to the caption cache)"
        else:
            todo.append(i)

    # 2. Caption the rest, streamed, storing each batch as it comes
    run = CaptionRun(captions, unreadable, captioned=0, cached=cached)
    if todo:
        started = time.perf_counter()
        processor = load_processor()
        run.num_workers = resolve_num_workers(num_workers, device)
        chunks = decoded_chunks([paths[i] for i in todo], processor.image_processor,
                                batch_size=planned_batch_size(batch_size, device),
                                num_workers=run.num_workers)
        try:
            # the workers decode meanwhile
            captioner = Captioner(processor, load_model(), prompt=settings["prompt"])
            run.batch_size = resolve_batch_size(batch_size, captioner, max_new_tokens=max_new_tokens)
            log.info("captioning %d images (batch %d, %d decoding workers; %d from the cache)", len(todo),
                     run.batch_size, run.num_workers, cached)
            with progress(total=len(todo), desc="captioning", unit="img", logger=log) as bar:
                for out in caption_batches(chunks, captioner, batch_size=run.batch_size,
                                           max_new_tokens=max_new_tokens):
                    done = [todo[j] for j in out.indices]
                    for i, text in zip(done, out.captions):
                        captions[i] = text
                    failed = {todo[j]: reason for j, reason in out.unreadable}
                    unreadable.update(failed)
                    if cache is not None:
                        cache.store(settings, [(digests[i], captions[i]) for i in done if digests[i] is not None])
                        cache.store_unreadable([(digests[i], r) for i, r in failed.items() if digests[i] is not None])
                    if run.first_batch_seconds is None and done:
                        run.first_batch_seconds, run.first_batch_images = time.perf_counter() - started, len(done)
                    run.captioned += len(done)
                    bar.update(len(out.indices) + len(out.unreadable))
            run.seconds = time.perf_counter() - started
            del captioner
        finally:
            del chunks  # stops the workers now (after an error: not only when the traceback is collected)
        free_device_memory(device)
        steady = run.steady_img_per_s
        log.info("captioned %d images in %.1f s (%.2f img/s; first batch after %.1f s, model load included%s)",
                 run.captioned, run.seconds, run.captioned / max(run.seconds, 1e-9), run.first_batch_seconds or 0.0,
                 f"; {steady:.2f} img/s after it" if steady is not None else "")

    # 3. Say what happened
    log.info("captioned %d, reused %d from the cache%s", run.captioned, cached,
             "" if cache is not None else " (caption cache off)")
    if unreadable:
        for i in sorted(unreadable):
            log.warning("skipped unreadable image %s: %s", paths[i], unreadable[i])
        names = ", ".join(str(paths[i]) for i in sorted(unreadable)[:_NAMED_UNREADABLE])
        more = len(unreadable) - _NAMED_UNREADABLE
        log.warning("skipped %d unreadable image(s) of %d: %s%s", len(unreadable), len(paths), names,
                    f" and {more} more" if more > 0 else "")
    return run


# ---------------------------------------------------------------------- sizes
def planned_batch_size(batch_size: int, device: torch.device) -> int:
    """The batch size as known before the model is loaded: as given, or the most that 0 (automatic) can
    resolve to on ``device``."""
    _check_batch_size(batch_size)
    if batch_size > 0:
        return batch_size
    return MAX_AUTO_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def resolve_batch_size(batch_size: int, captioner: Captioner, *, max_new_tokens: int) -> int:
    """``batch_size`` > 0 as given; 0: :data:`CPU_BATCH_SIZE` on a CPU, on CUDA what free memory allows."""
    _check_batch_size(batch_size)
    if batch_size > 0:
        return batch_size
    device = captioner.device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    per_image = generation_bytes_per_image(captioner.model.config, captioner.model.dtype,
                                           max_new_tokens=max_new_tokens)
    chosen = max(1, min(MAX_AUTO_BATCH_SIZE, int(free * AUTO_MEMORY_FRACTION // per_image)))
    log.info("caption batch size %d (%.1f GiB free on %s, about %.0f MiB per image)", chosen, free / 2**30,
             device, per_image / 2**20)
    return chosen


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 0:
        raise ValueError(f"caption batch size must be > 0, or 0 for automatic, got {batch_size}")


def generation_bytes_per_image(config: Any, dtype: torch.dtype, *, max_new_tokens: int) -> int:
    """A generous estimate of the GPU memory one image costs while its caption is generated.

    Counted from the config: the vision encoder's working set (one block: QKV, MLP 4x and residuals with
    headroom, 16 x tokens x hidden, plus the attention matrix should the kernel materialise it) and the
    language model's key/value cache (self and cross attention over the image tokens, BLIP; or over the
    query tokens, BLIP-2), plus float32 logits. BLIP-base in fp16: about 45 MiB.
    """
    vision, text = config.vision_config, config.text_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    context = getattr(config, "num_query_tokens", tokens)  # BLIP-2's LM sees the Q-Former's outputs
    layers = getattr(text, "num_decoder_layers", None) or text.num_hidden_layers
    encoder = tokens * vision.hidden_size * 16 + vision.num_attention_heads * tokens**2
    kv_cache = 2 * layers * (context + max_new_tokens) * text.hidden_size
    logits = 2 * text.vocab_size * 4
    return int((encoder + kv_cache) * torch.finfo(dtype).bits // 8 + logits)


def resolve_num_workers(num_workers: int, device: torch.device) -> int:
    """``num_workers`` >= 0 as given; :data:`AUTO` (-1): up to 4 on CUDA, 1 on a CPU, always leaving one core.

    Decoding and resizing a 500x375 JPEG costs about 5 ms of one core; a GPU captions BLIP-base at over a
    hundred images a second, a 2-core CPU at well under one (oscar_bench.client), hence the difference.
    """
    if num_workers >= 0:
        return num_workers
    if num_workers != AUTO:
        raise ValueError(f"caption workers must be >= 0, or {AUTO} for automatic, got {num_workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4 if device.type == "cuda" else 1, cores - 1))
