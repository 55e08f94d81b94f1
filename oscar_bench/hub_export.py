"""The server's models as Hugging Face checkpoints under their real hub ids, with random weights.

A GPU machine without hub access (``scripts/gpu-check.sh``) still runs the real stages: they load
``CompVis/stable-diffusion-v1-4`` and ``openai/clip-vit-base-patch32`` by hub id from a cache written here
(``HF_HUB_CACHE`` + ``HF_HUB_OFFLINE=1``), and the classifier starts from a ResNet-18 file where torchvision
keeps the ImageNet weights. The architectures are :mod:`oscar_bench.architectures`' (built on the device,
then saved); ``tiny=True`` runs the same assembly and saving on the tiny configs, so a CPU test covers it.
Random weights cost the same FLOPs and memory as the real ones; the reports say the models are stand-ins.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from torchvision import models
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from oscar_bench.architectures import VIT_B32, build_diffusion, clip_text_config
from oscar_common.training.classifier import imagenet_weights_path
from oscar_demo import tiny as tiny_models

log = logging.getLogger(__name__)

NOTE = "random-weight stand-in with the {size} architecture, written by oscar_bench.hub_export (outputs are noise)"
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)


def export_server_models(cache_dir: Path, device: torch.device, *, tiny: bool) -> dict[str, Path]:
    """Stable Diffusion 1.4 and CLIP ViT-B/32 into the hub cache ``cache_dir``; returns id -> snapshot.
    A model already there is left alone (as :func:`oscar_demo.tiny.install_models` does)."""
    savers = {tiny_models.DIFFUSION_ID: lambda out, seed: save_stable_diffusion(out, device, tiny=tiny, seed=seed),
              tiny_models.CLIP_ID: lambda out, seed: save_clip(out, device, tiny=tiny, seed=seed)}
    return tiny_models.install_models(cache_dir, savers, seed=0, note=NOTE.format(size="tiny" if tiny else "full-size"))


def save_stable_diffusion(out_dir: Path, device: torch.device, *, tiny: bool, seed: int = 0) -> Path:
    """SD-1.4's pipeline folder (UNet, VAE, CLIP-L text encoder, tokenizer, PNDM), full-size in float16
    (half the bytes to write; the stages load it in their own dtype)."""
    parts = build_diffusion(device, tiny=tiny, seed=seed)
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if not tiny:
        pipe.to(torch.float16)
    pipe.save_pretrained(out_dir)
    return out_dir


def save_clip(out_dir: Path, device: torch.device, *, tiny: bool, seed: int = 0) -> Path:
    """A whole CLIP checkpoint as the hub has it (text and vision towers, processor), ViT-B/32 sizes."""
    tokenizer = tiny_models.clip_tokenizer()
    text = (dict(hidden=tiny_models.TEXT_HIDDEN, layers=2, heads=4, mlp=64, projection=512) if tiny
            else dict(hidden=512, layers=12, heads=8, mlp=2048, projection=512))
    config = CLIPConfig(text_config=clip_text_config(tokenizer, **text).to_dict(),
                        vision_config=TINY_VISION if tiny else VIT_B32, projection_dim=512)
    torch.manual_seed(seed)
    with torch.device(device):
        model = CLIPModel(config).eval()
    side = (TINY_VISION if tiny else VIT_B32)["image_size"]
    model.save_pretrained(out_dir)
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def save_imagenet_resnet18_stand_in(seed: int = 0) -> Path:
    """A ResNet-18 state dict where torchvision looks for the ImageNet weights ($TORCH_HOME), so the
    default ``classifier-pretrained = true`` path runs; left alone if a file is already there."""
    path = imagenet_weights_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(models.resnet18(weights=None).state_dict(), path)
        log.info("wrote a random ResNet-18 as the ImageNet weights at %s", path)
    return path
