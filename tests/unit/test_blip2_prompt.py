"""BLIP-2 continues the run's ``blip2-prompt`` ("a photo of" by default, as the official code's LAVIS model
type); BLIP takes none. The prompt travels in the train instruction and keys the caption cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2Config, Blip2ForConditionalGeneration

from oscar_client.caption_cache import CaptionCache
from oscar_client.captioning import Captioner, captioner_prompt
from oscar_client.encoder import encode_client
from oscar_common.config import OscarConfig
from oscar_common.data.local import Sample
from oscar_common.models.loading import load_captioner_model, load_captioner_processor
from oscar_common.wire import TrainInstruction
from oscar_demo.tiny import BLIP2_ID, CAPTIONER_ID, CLIP_ID, install_tiny_blip2

CPU, F32 = torch.device("cpu"), torch.float32
OFFICIAL = "a photo of"  # LAVIS configs/models/blip2/blip2_caption_flant5xl.yaml:27


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tiny_hub: Path):
    """The tiny models, reached the way a client reaches real ones: HF_HUB_CACHE, and HF_HUB_OFFLINE=1
    (without it the hub client asks huggingface.co about every optional file, retrying for minutes)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(tiny_hub))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def blip2(tiny_hub: Path):
    install_tiny_blip2(tiny_hub)
    return load_captioner_processor(BLIP2_ID), load_captioner_model(BLIP2_ID, CPU, F32)


def _pixels(processor, colours=("red", "navy", "white")) -> torch.Tensor:
    images = [Image.new("RGB", (40, 30), colour) for colour in colours]
    return processor.image_processor(images=images, do_rescale=False, do_normalize=False,
                                     return_tensors="pt").pixel_values  # as the decoding workers hand them over


def test_the_default_prompt_is_the_official_one_and_reaches_the_client() -> None:
    cfg = OscarConfig(class_names=("cat",))
    assert cfg.blip2_prompt == OFFICIAL
    assert TrainInstruction.from_record(cfg.train_instruction().to_record()).blip2_prompt == OFFICIAL
    assert TrainInstruction.from_record(cfg.replace(blip2_prompt="").train_instruction().to_record()).blip2_prompt == ""


def test_blip2_continues_the_prompt_and_blip_takes_none(blip2) -> None:
    processor, model = blip2
    captioner = Captioner(processor, model, prompt=OFFICIAL)
    # the language model's input: 4 <image> placeholders, then "a photo of</s>" as T5 tokenizes it (as LAVIS)
    image_token = model.config.image_token_id
    assert captioner.prompt["input_ids"].tolist() == [[image_token] * 4 + processor.tokenizer(OFFICIAL).input_ids]
    pixels = _pixels(processor)
    with_prompt, without = captioner.generate(pixels, max_new_tokens=6), Captioner(processor, model).generate(
        pixels, max_new_tokens=6)
    assert with_prompt != without  # the prompt conditions the captions
    assert captioner_prompt(BLIP2_ID, OFFICIAL) == OFFICIAL
    assert captioner_prompt(CAPTIONER_ID, OFFICIAL) == ""  # BLIP captions unconditionally, as the paper
    with pytest.raises(ValueError, match="blip2-prompt applies to BLIP-2 captioners only"):
        Captioner(load_captioner_processor(CAPTIONER_ID), load_captioner_model(CAPTIONER_ID, CPU, F32), prompt=OFFICIAL)


def test_a_decoder_only_blip2_caption_leaves_the_prompt_out(blip2) -> None:
    """BLIP-2 OPT returns its input ids before the new tokens; the caption is only what follows the prompt."""
    processor, t5_model = blip2
    text = dict(model_type="opt", vocab_size=len(processor.tokenizer), hidden_size=32, ffn_dim=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                bos_token_id=1, eos_token_id=1, pad_token_id=0)
    parts = t5_model.config.to_dict()
    config = Blip2Config(vision_config=parts["vision_config"], qformer_config=parts["qformer_config"],
                         text_config=text, num_query_tokens=parts["num_query_tokens"],
                         image_token_index=parts["image_token_index"])
    torch.manual_seed(0)
    captioner = Captioner(processor, Blip2ForConditionalGeneration(config).eval(), prompt=OFFICIAL)
    pixels = _pixels(processor, ("red",))
    caption = captioner.generate(pixels, max_new_tokens=4)[0]
    captioner.input_length = 0  # what generate returns, whole
    assert captioner.generate(pixels, max_new_tokens=4)[0] == f"{OFFICIAL} {caption}"


def test_the_prompt_keys_the_caption_cache(tiny_hub: Path, tmp_path: Path) -> None:
    install_tiny_blip2(tiny_hub)
    (tmp_path / "data" / "cat").mkdir(parents=True)
    samples = []
    for k, colour in enumerate(("red", "navy", "white")):
        path = tmp_path / "data" / "cat" / f"{k}.png"
        Image.fromarray(np.full((30, 40, 3), 60 * k, np.uint8)).save(path)
        samples.append(Sample(path, "cat"))

    def encode(prompt: str, cache: CaptionCache):
        return encode_client(samples, ["cat"], scheme="pooled", captioner_id=BLIP2_ID, encoder_id=CLIP_ID, device=CPU,
                             dtype=F32, batch_size=3, max_new_tokens=6, num_workers=0, cache=cache,
                             blip2_prompt=prompt)

    with CaptionCache.open(tmp_path / "out") as cache:
        first = encode(OFFICIAL, cache)
        assert first.caption_settings["prompt"] == OFFICIAL and first.captioned == 3
        assert encode(OFFICIAL, cache).cached == 3  # same prompt: taken from the cache
        other = encode("", cache)  # another prompt: captioned again, not served the other prompt's captions
        assert other.captioned == 3 and other.caption_settings["prompt"] == ""
        assert other.captions != first.captions
