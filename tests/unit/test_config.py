"""One config object: pyproject defaults, run-config overrides, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from oscar_common.config import OscarConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_dataclass_defaults() -> None:
    cfg = OscarConfig.from_run_config(app_config())
    assert cfg == OscarConfig()
    assert not cfg.extra, f"pyproject keys unknown to OscarConfig: {dict(cfg.extra)}"
    # every field is settable from the run config (a field missing in pyproject cannot be overridden)
    assert set(cfg.to_dict()) == set(app_config())


def test_paper_defaults() -> None:
    cfg = OscarConfig()
    assert (cfg.scheme, cfg.guidance_scale, cfg.num_inference_steps, cfg.images_per_class) == ("pooled", 7.5, 50, 10)
    assert cfg.captioner == "Salesforce/blip-image-captioning-base"
    assert cfg.text_encoder == "openai/clip-vit-base-patch32"
    assert cfg.diffusion_model == "CompVis/stable-diffusion-v1-4"


def test_overrides_are_coerced() -> None:
    cfg = OscarConfig.from_run_config({"class-names": "cat, dog ,horse", "epochs": 3, "guidance-scale": 5,
                                       "classifier-pretrained": "false", "scheme": "tokens"})
    assert cfg.class_names == ("cat", "dog", "horse")
    assert cfg.epochs == 3 and cfg.guidance_scale == 5.0 and cfg.classifier_pretrained is False
    # tokens: clients encode with Stable Diffusion's own text encoder
    assert cfg.client_encoder_id == cfg.diffusion_model
    assert cfg.client_instruction()["encoder-id"] == cfg.diffusion_model


@pytest.mark.parametrize("overrides, message", [
    ({"scheme": "pixels"}, "scheme must be one of"),
    ({"epochs": -1}, "epochs must be >= 0"),
    ({"train-recipe": "fast"}, "train-recipe must be one of"),
    ({"epochs": 1.5}, "epochs must be a number"),
    ({"class-names": "cat,cat"}, "duplicates"),
    ({"prompt-template": "{class_name}"}, "must contain '{prompt}'"),
    ({"classifier-pretrained": "maybe"}, "true or false"),
])
def test_bad_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        OscarConfig.from_run_config(overrides)
