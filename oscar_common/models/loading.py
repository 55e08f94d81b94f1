"""Load the frozen models (BLIP or BLIP-2 captioner, CLIP text encoders, Stable Diffusion) by hub id or local dir.

Every loader takes a Hugging Face hub id (``"openai/clip-vit-base-patch32"``) or a local directory
written by ``save_pretrained``. Offline machines work through the hub cache: ``HF_HUB_CACHE`` names the
cache and ``HF_HUB_OFFLINE=1`` stops any network access. Both variables are read when a loader is
called (``huggingface_hub`` itself reads them once, at import).
A model that is not there raises :class:`ModelNotFoundError`, which says how to fetch it. Do set
``HF_HUB_OFFLINE=1`` on machines without network access: otherwise the hub client asks huggingface.co
about every file, retrying for minutes, even when the model is cached.

All models come back in eval mode with gradients off: OSCAR never trains them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipForConditionalGeneration,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from oscar_common.choices import SCHEDULERS
from oscar_common.logs import interactive

if TYPE_CHECKING:  # diffusers takes seconds to import: only the server (and a preview) loads a pipeline
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

class ModelNotFoundError(RuntimeError):
    """A model id is neither a local directory nor in the local hub cache (and cannot be downloaded)."""

    def __init__(self, model_id: str, reason: str = "") -> None:
        cache = os.environ.get("HF_HUB_CACHE") or "the default Hugging Face cache"
        where = "HF_HUB_OFFLINE=1" if _offline() else "and the hub could not provide it"
        super().__init__(
            f"model {model_id!r} was not found locally (looked in {cache}; {where}). "
            f"Fetch it on a machine with internet with `hf download {model_id}` (huggingface_hub CLI), "
            f"then copy that cache here and point HF_HUB_CACHE at it, or pass a local directory path "
            f"(written by save_pretrained / `hf download {model_id} --local-dir DIR`) instead of the id."
            + (f" Cause: {reason}" if reason else "")
        )
        self.model_id = model_id


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _hub_kwargs() -> dict[str, Any]:
    """``from_pretrained`` arguments that honour HF_HUB_CACHE / HF_HUB_OFFLINE as they are *now*."""
    cache = os.environ.get("HF_HUB_CACHE")
    return {"cache_dir": str(cache) if cache else None, "local_files_only": _offline()}


@contextlib.contextmanager
def _translate_missing(model_id: str) -> Iterator[None]:
    """Turn the hub's many "not found / offline" errors (all OSError subclasses) into ModelNotFoundError.

    A local directory that fails to load is broken rather than missing: its error passes through.
    """
    if not Path(model_id).is_dir():
        try:  # a path that does not exist ("./models/blip") is no hub id either: say so, not "bad repo id"
            validate_repo_id(model_id)
        except HFValidationError as exc:
            raise ModelNotFoundError(model_id, f"not an existing directory, nor a hub id ({exc})") from exc
    try:
        yield
    except OSError as exc:
        if Path(model_id).is_dir():
            raise
        raise ModelNotFoundError(model_id, str(exc).splitlines()[0]) from exc


class _CLIPTextTower(CLIPTextModelWithProjection):
    """CLIPTextModelWithProjection that expects a full CLIP checkpoint: skipping its vision tower is the
    point, so those keys are not reported as unexpected (missing text keys still are)."""

    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]


def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.to(device).eval()
    model.requires_grad_(False)
    return model


# Captioner families by the checkpoint's ``model_type``: BLIP (the paper's Salesforce/blip-image-captioning-base,
# the default) and BLIP-2 (what the official OSCAR code runs: Salesforce/blip2-flan-t5-xl).
CAPTIONERS = {
    "blip": (BlipProcessor, BlipForConditionalGeneration),
    "blip-2": (Blip2Processor, Blip2ForConditionalGeneration),
}


def load_captioner_processor(model_id: str) -> BlipProcessor | Blip2Processor:
    """An image captioner's processor (small files, no weights), BLIP or BLIP-2 as the checkpoint's config says.

    Loaded apart from the model: a client's image decoding starts with it while the model loads
    (``oscar_client.captioning.caption_files``)."""
    with _translate_missing(model_id):
        processor_class, _ = CAPTIONERS[captioner_type(model_id)]
        return processor_class.from_pretrained(model_id, **_hub_kwargs())


def load_captioner_model(
    model_id: str, device: torch.device, dtype: torch.dtype
) -> BlipForConditionalGeneration | Blip2ForConditionalGeneration:
    """The captioner's frozen model on ``device``, BLIP or BLIP-2 as the checkpoint's config says."""
    with _translate_missing(model_id):
        model_type = captioner_type(model_id)
        model = CAPTIONERS[model_type][1].from_pretrained(model_id, dtype=dtype, **_hub_kwargs())
    log.info("loaded captioner %s (%s) on %s (%s)", model_id, model_type, device, dtype)
    return _frozen(model, device)


def captioner_type(model_id: str) -> str:
    """``"blip"`` or ``"blip-2"``, from the checkpoint's config (no weights are loaded)."""
    model_type = AutoConfig.from_pretrained(model_id, **_hub_kwargs()).model_type
    if model_type not in CAPTIONERS:
        raise ValueError(f"captioner {model_id!r} is a {model_type!r} checkpoint; supported captioners are "
                         f"{', '.join(repr(t) for t in CAPTIONERS)} checkpoints (e.g. "
                         "Salesforce/blip-image-captioning-base, Salesforce/blip2-flan-t5-xl)")
    return model_type


def checkpoint_revision(model_id: str) -> str:
    """What identifies the files ``model_id`` resolves to now, without loading the model.

    A hub id: its snapshot's commit hash (``config.json`` is fetched if absent and the hub is reachable).
    A local directory: a digest of its files' relative names, sizes and modification times, so replacing
    the weights in place gives a new revision. Used to key cached model outputs (the client's captions).
    """
    if Path(model_id).is_dir():
        root = Path(model_id)
        digest = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return "dir:" + digest.hexdigest()
    kwargs = _hub_kwargs()
    with _translate_missing(model_id):
        config_path = hf_hub_download(model_id, "config.json", **kwargs)
    return Path(config_path).parent.name  # <cache>/models--Org--Name/snapshots/<commit>/config.json


def load_clip_text_encoder(
    model_id: str, device: torch.device, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModelWithProjection]:
    """The text tower + projection of a CLIP checkpoint (a full CLIPModel repo: the vision tower is skipped)."""
    kwargs = _hub_kwargs()
    with _translate_missing(model_id):
        tokenizer = CLIPTokenizer.from_pretrained(model_id, **kwargs)
        model = _CLIPTextTower.from_pretrained(model_id, dtype=dtype, **kwargs)
    log.info("loaded CLIP text encoder %s (projection %d) on %s", model_id, model.config.projection_dim, device)
    return tokenizer, _frozen(model, device)


class NoVisionTowerError(RuntimeError):
    """A CLIP checkpoint without its vision tower: images cannot be put in its joint space."""

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"CLIP model {model_id!r} has no vision tower ({reason}); the synthesis fidelity "
                         "embeds the images with the vision tower of the CLIP whose text tower encoded the uploads "
                         "(the run config's text-encoder): use a full CLIP checkpoint (text and vision towers, "
                         "e.g. openai/clip-vit-base-patch32)")
        self.model_id = model_id


class _CLIPVisionTower(CLIPVisionModelWithProjection):
    """CLIPVisionModelWithProjection that expects a full CLIP checkpoint: its text tower is skipped."""

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^text_projection\.", r"^logit_scale$"]


def load_clip_vision_encoder(
    model_id: str, device: torch.device, dtype: torch.dtype
) -> tuple[CLIPImageProcessor, CLIPVisionModelWithProjection]:
    """The vision tower + projection of a CLIP checkpoint and its image processor: the image side of the
    joint space whose text side :func:`load_clip_text_encoder` loads (the server's synthesis fidelity).

    A model that is not there raises :class:`ModelNotFoundError`; a checkpoint without vision weights (a
    text-only export) raises :class:`NoVisionTowerError`: random vision weights would give figures that
    mean nothing."""
    kwargs = _hub_kwargs()
    check_clip_vision_config(model_id)
    with _translate_missing(model_id):
        processor = CLIPImageProcessor.from_pretrained(model_id, **kwargs)
        model, info = _CLIPVisionTower.from_pretrained(model_id, dtype=dtype, output_loading_info=True, **kwargs)
    missing = [key for key in info["missing_keys"] if key.startswith(("vision_model.", "visual_projection."))]
    if missing:
        raise NoVisionTowerError(model_id, f"{len(missing)} vision weights are missing, e.g. {missing[0]}")
    log.info("loaded CLIP vision encoder %s (projection %d) on %s", model_id, model.config.projection_dim, device)
    return processor, _frozen(model, device)


def check_clip_vision_config(model_id: str) -> None:
    """Raise :class:`NoVisionTowerError` unless the checkpoint's config has a vision tower (no weights are
    read: the server checks this before contacting any client)."""
    with _translate_missing(model_id):
        if getattr(AutoConfig.from_pretrained(model_id, **_hub_kwargs()), "vision_config", None) is None:
            raise NoVisionTowerError(model_id, "its config has no vision_config")


def load_diffusion_text_encoder(
    model_id: str, device: torch.device, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A Stable Diffusion repo's own text encoder (``tokenizer/`` and ``text_encoder/`` subfolders)."""
    kwargs = _hub_kwargs()
    with _translate_missing(model_id):
        # CLIPTokenizer, not AutoTokenizer: the latter wants a config.json that tokenizer/ does not have.
        tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **kwargs)
        model = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", dtype=dtype, **kwargs)
    log.info("loaded diffusion text encoder %s (hidden %d) on %s", model_id, model.config.hidden_size, device)
    return tokenizer, _frozen(model, device)


def load_diffusion_pipeline(
    model_id: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    scheduler: str,
) -> "StableDiffusionPipeline":
    """Stable Diffusion text-to-image pipeline without the safety checker.

    ``scheduler``: ``"official"`` (the official OSCAR code's sampling: SD 1.x's own PNDM over the last
    ``num_inference_steps`` entries of its timestep list, one UNet call per step; the official code builds a
    DDIMScheduler but never attaches it; :mod:`oscar_common.models.official_scheduler`), ``"pndm"`` (the same PNDM
    over its whole list, as diffusers' pipeline runs it: one UNet call more), ``"ddim"`` (DDIM over the
    checkpoint's betas, SD 1.x: 0.00085..0.012 scaled_linear), ``"default"`` keeps the checkpoint's.
    """
    from diffusers import StableDiffusionPipeline

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    kwargs = _hub_kwargs()
    with _translate_missing(model_id):
        # The synthetic images train a classifier; NSFW filtering would only blacken some of them.
        pipe = StableDiffusionPipeline.from_pretrained(
            model_id, dtype=dtype, safety_checker=None, requires_safety_checker=False, **kwargs
        )
    setup_diffusion_pipeline(pipe, device, scheduler=scheduler)
    log.info("loaded diffusion pipeline %s on %s (%s, scheduler %s)", model_id, device, dtype,
             type(pipe.scheduler).__name__)
    return pipe


def setup_diffusion_pipeline(pipe: "StableDiffusionPipeline", device: torch.device, *, scheduler: str) -> None:
    """What :func:`load_diffusion_pipeline` does to a pipeline once its weights are loaded: the scheduler
    the run config names, the device, gradients off, a quiet progress bar. Also for pipelines assembled
    from parts (oscar-bench builds the architectures with random weights)."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if scheduler == "official":
        from oscar_common.models.official_scheduler import OfficialPNDMScheduler

        pipe.scheduler = OfficialPNDMScheduler.from_checkpoint(pipe.scheduler.config)
    elif scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    elif scheduler == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    # One short-lived bar per batch: keep it off the log once done.
    pipe.set_progress_bar_config(desc="denoising", leave=False, disable=not interactive())


def check_diffusion_pipeline_files(model_id: str) -> Path:
    """The pipeline's folder, after checking that every component it lists has its config and weights.

    Reads files only (no weights are loaded), so the server can say "missing" before any client works.
    """
    if Path(model_id).is_dir():
        root = Path(model_id)
    else:
        with _translate_missing(model_id):
            root = Path(snapshot_download(model_id, cache_dir=_hub_kwargs()["cache_dir"], local_files_only=True,
                                          allow_patterns=["model_index.json"]))
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(model_id, f"{index} is missing: not a diffusers pipeline")
    missing = []
    for component, spec in json.loads(index.read_text()).items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue  # metadata, or an optional component that is absent (e.g. the safety checker)
        folder = root / component
        weights = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")] if folder.is_dir() else []
        configs = list(folder.glob("*.json")) if folder.is_dir() else []
        if not configs or (component in ("unet", "vae", "text_encoder") and not weights):
            missing.append(component)
    if missing:
        raise ModelNotFoundError(model_id, f"components without config or weights: {missing}")
    return root


def text_embedding_dim(scheme: str, model_id: str) -> int:
    """The size of what clients upload per class and position, from the encoder's config alone.

    ``pooled``: the CLIP projection dim (512 for ViT-B/32); ``tokens``: the SD text encoder's hidden size.
    The server calls this before contacting any client, so a missing model fails the run at once.
    """
    kwargs = _hub_kwargs()
    with _translate_missing(model_id):
        if scheme == "pooled":
            return int(CLIPConfig.from_pretrained(model_id, **kwargs).projection_dim)
        return int(CLIPTextConfig.from_pretrained(model_id, subfolder="text_encoder", **kwargs).hidden_size)


STAND_IN_MARKER = "OSCAR_STAND_IN.txt"  # written next to the tiny demo/test models (oscar_demo.tiny)


def stand_in_note(model_id: str) -> str | None:
    """The marker text when ``model_id`` resolves to a tiny random-weight stand-in, else None."""
    local = Path(model_id) / STAND_IN_MARKER
    if local.is_file():
        return local.read_text().strip()
    if Path(model_id).is_dir():
        return None
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return None
    cached = try_to_load_from_cache(model_id, STAND_IN_MARKER, cache_dir=_hub_kwargs()["cache_dir"])
    return Path(cached).read_text().strip() if isinstance(cached, str) else None
