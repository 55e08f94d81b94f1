"""The models the server and the client run, built from their published configs with random weights.

Nothing is downloaded: random weights cost the same FLOPs and memory traffic as trained ones, so the
timings hold for the real checkpoints. Full-size models are constructed under ``torch.device(device)``
so their parameters are allocated and initialised on the accelerator (seconds, not minutes on the CPU).
``tiny=True`` builds the tiny stand-ins of :mod:`oscar_demo.tiny` instead, so the same benchmark code
runs on a CPU in seconds.

Published configs (hub ``config.json`` files, copied as numbers):

* Stable Diffusion 1.4 (``CompVis/stable-diffusion-v1-4``): UNet sample 64, blocks 320/640/1280/1280,
  2 layers per block, cross-attention 768, attention head dim 8; VAE 128/256/512/512, 4 latent channels;
  text encoder CLIP ViT-L/14 (768 wide, 12 layers, 12 heads, MLP 3072); PNDM, scaled_linear
  0.00085..0.012, steps_offset 1.
* CLIP ViT-B/32 text tower (``openai/clip-vit-base-patch32``): 512 wide, 12 layers, 8 heads, MLP 2048,
  projection 512: the encoder the pooled scheme inverts against. Its vision tower: 768 wide, 12 layers,
  12 heads, MLP 3072, patch 32 at 224, projection 512: what the server's synthesis fidelity embeds images with.
* ResNet-18 (torchvision): the classifier the server trains.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from torch import nn
from torchvision import models
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH
from oscar_common.models.loading import load_clip_vision_encoder
from oscar_demo import tiny as tiny_models

log = logging.getLogger(__name__)

# CLIP ViT-B/32's vision tower (openai/clip-vit-base-patch32's config.json): 224 px, patch 32, 768 x 12.
VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32)



@dataclass
class DiffusionParts:
    """The parts of a Stable Diffusion 1.x pipeline, in float32 on ``device`` (eval mode, no gradients)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: PNDMScheduler  # the checkpoint's own scheduler (SD 1.4: PNDM)

    @property
    def native_resolution(self) -> int:
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.unet.config.sample_size * vae_scale


def sd14_scheduler() -> PNDMScheduler:
    """SD 1.4's ``scheduler/scheduler_config.json``."""
    return PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                         steps_offset=1)


def clip_text_config(tokenizer: CLIPTokenizer, *, hidden: int, layers: int, heads: int, mlp: int,
                      projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=CLIP_CONTEXT_LENGTH, hidden_act="quick_gelu",
                          projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


class _CLIPTextTower(CLIPTextModelWithProjection):
    """The text tower of a full CLIP checkpoint: its vision weights are skipped on purpose, not reported."""

    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def build_diffusion(device: torch.device, *, tiny: bool, seed: int = 0) -> DiffusionParts:
    """SD-1.4's UNet, VAE and CLIP ViT-L/14 text encoder (or the tiny ones), float32 on ``device``."""
    tokenizer = tiny_models.clip_tokenizer()
    torch.manual_seed(seed)
    if tiny:
        with tempfile.TemporaryDirectory() as tmp:
            saved = tiny_models.save_tiny_stable_diffusion(Path(tmp), seed=seed)
            unet = UNet2DConditionModel.from_pretrained(saved, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(saved, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(saved, subfolder="text_encoder")
            scheduler = PNDMScheduler.from_pretrained(saved, subfolder="scheduler")
        parts = DiffusionParts(unet.to(device), vae.to(device), text_encoder.to(device), tokenizer, scheduler)
    else:
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, norm_num_groups=32,
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                norm_num_groups=32, sample_size=512,
            )
            text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=768, layers=12, heads=12,
                                                           mlp=3072, projection=768))
        parts = DiffusionParts(unet, vae, text_encoder, tokenizer, sd14_scheduler())
    for module in (parts.unet, parts.vae, parts.text_encoder):
        _frozen(module)
    log.info("built %s Stable Diffusion 1.4 parts on %s: UNet %.0fM, VAE %.0fM, text encoder %.0fM params",
             "tiny" if tiny else "full-size", device, *(count_parameters(m) / 1e6 for m in
                                                        (parts.unet, parts.vae, parts.text_encoder)))
    return parts


def build_clip_text_tower(device: torch.device, *, tiny: bool, seed: int = 0
                          ) -> tuple[CLIPTokenizer, CLIPTextModelWithProjection]:
    """CLIP ViT-B/32's text tower with its 512-d projection (or the tiny one), float32 on ``device``."""
    tokenizer = tiny_models.clip_tokenizer()
    torch.manual_seed(seed)
    if tiny:
        with tempfile.TemporaryDirectory() as tmp:
            saved = tiny_models.save_tiny_clip(Path(tmp), seed=seed)
            model = _CLIPTextTower.from_pretrained(saved)
        model = model.to(device)
    else:
        with torch.device(device):
            model = CLIPTextModelWithProjection(clip_text_config(tokenizer, hidden=512, layers=12, heads=8,
                                                                  mlp=2048, projection=512))
    return tokenizer, _frozen(model)


def build_clip_vision_tower(device: torch.device, *, tiny: bool, seed: int = 0
                            ) -> tuple[CLIPImageProcessor, CLIPVisionModelWithProjection]:
    """CLIP ViT-B/32's vision tower with its 512-d projection and image processor (224; or the tiny ones),
    float32 on ``device``."""
    torch.manual_seed(seed)
    if tiny:
        with tempfile.TemporaryDirectory() as tmp:
            saved = tiny_models.save_tiny_clip(Path(tmp), seed=seed)
            return load_clip_vision_encoder(str(saved), device, torch.float32)
    with torch.device(device):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_B32, projection_dim=512))
    return CLIPImageProcessor(), _frozen(model)  # the processor's defaults are ViT-B/32's: 224, CLIP's mean/std


def build_resnet18(num_classes: int, device: torch.device, seed: int = 0) -> nn.Module:
    """torchvision ResNet-18 with a ``num_classes``-way head (the same at every scale)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return models.resnet18(weights=None, num_classes=num_classes)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
