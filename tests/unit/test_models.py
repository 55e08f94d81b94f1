"""Model loading by hub id through a Hugging Face cache (tiny models from oscar_demo.tiny), offline."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipForConditionalGeneration,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

import oscar_common.models.loading as models
from oscar_client.captioning import Captioner
from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH
from oscar_demo.tiny import (
    BLIP2_ID,
    CAPTIONER_ID,
    CLIP_ID,
    DIFFUSION_ID,
    SD_IMAGE_SIZE,
    TEXT_HIDDEN,
    install_tiny_blip2,
    install_tiny_models,
)

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture
def offline_hub(tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny models reached the way a deployment reaches real ones: HF_HUB_CACHE + HF_HUB_OFFLINE=1."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_hub


def test_install_is_idempotent_and_deterministic(tiny_hub: Path, tmp_path: Path) -> None:
    again = install_tiny_models(tiny_hub)  # already there: nothing rebuilt, same snapshots
    fresh = install_tiny_models(tmp_path)
    for model_id, snapshot in again.items():
        assert (snapshot.parent.parent / "refs" / "main").read_text() == snapshot.name
        assert len(snapshot.name) == 40
        # same seed -> same snapshot hash and byte-identical weights
        assert fresh[model_id].name == snapshot.name
    weights = "text_encoder/model.safetensors"
    assert (fresh[DIFFUSION_ID] / weights).read_bytes() == (again[DIFFUSION_ID] / weights).read_bytes()
    assert not list(tmp_path.glob(".tmp-*")), "temporary build folders left behind"


def test_captioner_by_hub_id(offline_hub: Path) -> None:
    processor = models.load_captioner_processor(CAPTIONER_ID)
    model = models.load_captioner_model(CAPTIONER_ID, CPU, F32)
    assert isinstance(model, BlipForConditionalGeneration)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    inputs = processor(images=[Image.new("RGB", (40, 30), "red")], return_tensors="pt")
    text = processor.batch_decode(model.generate(**inputs, max_new_tokens=8), skip_special_tokens=True)[0]
    assert text.strip() and "[DEC]" not in text


def test_blip2_captioner_by_hub_id(offline_hub: Path) -> None:
    snapshot = install_tiny_blip2(offline_hub)
    processor = models.load_captioner_processor(BLIP2_ID)  # chosen by the config's model_type
    model = models.load_captioner_model(BLIP2_ID, CPU, F32)
    assert isinstance(model, Blip2ForConditionalGeneration) and isinstance(processor, Blip2Processor)
    assert model.config.text_config.model_type == "t5"  # encoder-decoder LM, as blip2-flan-t5-xl
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    captioner = Captioner(processor, model)
    # the language model's input: 4 <image> placeholders (one per query token), then the empty prompt's </s>
    image_token = model.config.image_token_id
    assert captioner.prompt["input_ids"].tolist() == [[image_token] * 4 + [processor.tokenizer.eos_token_id]]
    images = [Image.new("RGB", (40, 30), colour) for colour in ("red", "navy", "white")]
    pixels = processor.image_processor(images=images, do_rescale=False, do_normalize=False,
                                       return_tensors="pt").pixel_values  # as CaptionInputs gives them
    captions = captioner.generate(pixels, max_new_tokens=6)
    assert len(captions) == 3 and all(captions) and len(set(captions)) == 3  # image-dependent captions
    assert not any("<image>" in c or "</s>" in c for c in captions)
    from_dir = Captioner(models.load_captioner_processor(str(snapshot)),
                         models.load_captioner_model(str(snapshot), CPU, F32))
    assert captions == from_dir.generate(pixels, max_new_tokens=6)


def test_a_captioner_of_another_kind_is_refused(offline_hub: Path) -> None:
    with pytest.raises(ValueError, match="'clip' checkpoint; supported captioners are 'blip', 'blip-2'"):
        models.load_captioner_processor(CLIP_ID)
    with pytest.raises(ValueError, match="'clip' checkpoint; supported captioners are 'blip', 'blip-2'"):
        models.load_captioner_model(CLIP_ID, CPU, F32)


def test_checkpoint_revision(offline_hub: Path, tmp_path: Path) -> None:
    snapshot = install_tiny_models(offline_hub)[CAPTIONER_ID]
    assert models.checkpoint_revision(CAPTIONER_ID) == snapshot.name  # the hub snapshot's commit
    local = tmp_path / "blip"
    local.mkdir()
    (local / "config.json").write_text("{}")
    before = models.checkpoint_revision(str(local))
    assert before.startswith("dir:") and models.checkpoint_revision(str(local)) == before
    (local / "model.safetensors").write_bytes(b"new weights")  # replaced in place: another revision
    assert models.checkpoint_revision(str(local)) != before
    with pytest.raises(models.ModelNotFoundError, match="nobody/nothing"):
        models.checkpoint_revision("nobody/nothing")


def test_clip_text_tower_from_full_clip_checkpoint(offline_hub: Path) -> None:
    tokenizer, model = models.load_clip_text_encoder(CLIP_ID, CPU, F32)
    assert isinstance(model, CLIPTextModelWithProjection)
    assert model.config.projection_dim == 512 and tokenizer.model_max_length == CLIP_CONTEXT_LENGTH
    assert len(tokenizer) == 49408  # the real CLIP BPE vocabulary
    ids = tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # same ids as openai/clip-vit-base-patch32
    assert model(input_ids=torch.tensor([ids])).text_embeds.shape == (1, 512)


def test_diffusion_text_encoder_and_pipeline(offline_hub: Path) -> None:
    tokenizer, text_encoder = models.load_diffusion_text_encoder(DIFFUSION_ID, CPU, F32)
    assert isinstance(text_encoder, CLIPTextModel) and tokenizer.model_max_length == CLIP_CONTEXT_LENGTH

    pipe = models.load_diffusion_pipeline(DIFFUSION_ID, CPU, F32, scheduler="ddim")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    assert not pipe.scheduler.config.clip_sample and not pipe.scheduler.config.set_alpha_to_one
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (SD_IMAGE_SIZE, SD_IMAGE_SIZE)

    # official (the run's default) and pndm: SD-1.4's own PNDM, the official code's last-50 cut and the whole list
    for name in ("official", "pndm"):
        assert isinstance(models.load_diffusion_pipeline(DIFFUSION_ID, CPU, F32, scheduler=name).scheduler,
                          PNDMScheduler)
    with pytest.raises(ValueError):
        models.load_diffusion_pipeline(DIFFUSION_ID, CPU, F32, scheduler="euler")


def test_a_local_dir_loads_what_its_hub_id_loads(offline_hub: Path) -> None:
    _, model = models.load_clip_text_encoder(CLIP_ID, CPU, F32)
    snapshot = install_tiny_models(offline_hub)[CLIP_ID]
    _, from_dir = models.load_clip_text_encoder(str(snapshot), CPU, F32)
    assert torch.equal(model.text_projection.weight, from_dir.text_projection.weight)


@pytest.mark.parametrize("model_id", ["nobody/does-not-exist", "./no/such/dir"])
@pytest.mark.parametrize("loader", [lambda model_id, *_: models.load_captioner_processor(model_id),
                                    models.load_captioner_model, models.load_clip_text_encoder,
                                    models.load_diffusion_text_encoder,
                                    functools.partial(models.load_diffusion_pipeline, scheduler="pndm"),
                                    lambda model_id, *_: models.check_diffusion_pipeline_files(model_id)])
def test_missing_model_fails_fast_and_says_how_to_fetch(offline_hub: Path, loader, model_id: str) -> None:
    start = time.perf_counter()
    with pytest.raises(models.ModelNotFoundError) as info:
        loader(model_id, CPU, F32)
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert repr(model_id) in message and f"hf download {model_id}" in message
    assert "HF_HUB_OFFLINE" in message and "HF_HUB_CACHE" in message


def test_text_embedding_dim_from_config_only(offline_hub: Path) -> None:
    assert models.text_embedding_dim("pooled", CLIP_ID) == 512
    assert models.text_embedding_dim("tokens", DIFFUSION_ID) == TEXT_HIDDEN
    with pytest.raises(models.ModelNotFoundError, match="nobody/nothing"):
        models.text_embedding_dim("pooled", "nobody/nothing")
