"""Image files -> unit CLIP image embeddings, with a CLIP vision tower, in batches on the run's device.

A batch's PNGs are decoded in a few threads (PIL releases the GIL while it decodes): at 512x512 one
decode costs more than ViT-B/32 needs on a GPU for the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

DECODE_THREADS = min(8, os.cpu_count() or 1)


def embedding_batch_size(device: torch.device) -> int:
    """Images per vision-tower call: ViT-B/32 at 224 needs ~2 MB of activations per image in half precision."""
    return 256 if device.type == "cuda" else 16


def _decode(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@torch.inference_mode()
def embed_pixels(pixel_values: torch.Tensor, model: CLIPVisionModelWithProjection) -> torch.Tensor:
    """``[N, D]`` unit image embeddings (float32, CPU) of preprocessed ``pixel_values``."""
    embeds = model(pixel_values=pixel_values.to(model.device, model.dtype)).image_embeds
    return F.normalize(embeds.float(), dim=-1).cpu()


def embed_image_files(paths: Sequence[Path], processor: CLIPImageProcessor, model: CLIPVisionModelWithProjection,
                      batch_size: int) -> torch.Tensor:
    """``[len(paths), D]`` unit image embeddings, in the order of ``paths``."""
    chunks = [torch.empty(0, model.config.projection_dim)]
    with ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="decode") as pool:
        for start in range(0, len(paths), batch_size):
            images = list(pool.map(_decode, paths[start:start + batch_size]))
            chunks.append(embed_pixels(processor(images=images, return_tensors="pt").pixel_values, model))
    return torch.cat(chunks)
