"""One config object: pyproject defaults, run-config overrides, clear errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from oscar_common.config import OscarConfig
from oscar_common.settings import coerce, declared_settings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_holds_exactly_the_declared_keys_and_defaults() -> None:
    declared = {s.key: s for s in declared_settings(OscarConfig)}
    listed = app_config()
    assert sorted(set(declared) - set(listed)) == [], "declared keys missing from pyproject.toml (cannot be overridden)"
    assert sorted(set(listed) - set(declared)) == [], "pyproject.toml keys that no setting declares"
    differing = {key: (value, declared[key].default) for key, value in listed.items()
                 if coerce(declared[key], value) != declared[key].default}
    assert differing == {}, "pyproject.toml value vs declared default"
    assert OscarConfig.from_run_config(listed) == OscarConfig()


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
    assert cfg.train_instruction().encoder_id == cfg.diffusion_model


@pytest.mark.parametrize("overrides, message", [
    ({"scheme": "pixels"}, "scheme must be one of"),
    ({"epochs": -1}, "epochs must be >= 0"),
    ({"train-recipe": "fast"}, "train-recipe must be one of"),
    ({"train-precision": "fp8"}, "train-precision must be one of"),
    ({"decode-workers": -2}, "decode-workers must be >= 0, or -1"),
    ({"guidance-scale": -1}, "guidance-scale must be >= 1"),
    ({"lr": -0.1}, "lr must be >= 0"),
    ({"batch-size": -1}, "batch-size must be >= 0"),
    ({"train-timeout": -5}, "train-timeout must be > 0 seconds"),
    ({"image-resolution": 100}, "image-resolution must be 0 (native) or a multiple of 8"),
    ({"inversion-tokens": 80}, "inversion-tokens must be between 1 and 75"),
    ({"guidance-scale": float("nan")}, "guidance-scale must be a finite number"),
    ({"transport-dtype": "int8"}, "transport-dtype must be one of"),
    ({"dp-max-epsilon": 2, "prototypes-per-class": 3}, "cannot be combined with prototypes-per-class > 1"),
    ({"run-name": "../elsewhere"}, "run-name must be a plain folder name"),
    ({"epochs": 1.5}, "epochs must be a number"),
    ({"class-names": "cat,cat"}, "duplicates"),
    ({"prompt-template": "{class_name}"}, "must contain '{prompt}'"),
    ({"classifier-pretrained": "maybe"}, "true or false"),
    ({"num-processes": "two"}, "num-processes must be 'auto' or a whole number >= 1"),
    ({"num-processes": 0}, "num-processes must be 'auto' or a whole number >= 1"),
    ({"compile": "sometimes"}, "compile must be one of ('auto', 'true', 'false')"),
    ({"generation-batch-size": -1}, "generation-batch-size must be >= 0 (0: chosen from free GPU memory)"),
    ({"inversion-chunk-size": -2}, "inversion-chunk-size must be >= 0 (0: chosen from free GPU memory)"),
    ({"png-writers": -1}, "png-writers must be >= 0"),
])
def test_bad_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        OscarConfig.from_run_config(overrides)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        OscarConfig.from_run_config({"guidance-scale": -1, "lr": -0.1, "epochs": -1})
    assert all(key in str(info.value) for key in ("guidance-scale", "lr", "epochs"))
