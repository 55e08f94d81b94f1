"""One configuration object for the whole run.

Built from Flower's ``context.run_config`` (``[tool.flwr.app.config]`` in pyproject.toml, overridden
with ``flwr run --run-config``). Keys are kebab-case there and snake_case here. The server builds it;
clients never read their own copy: they get what they need in the train instruction
(:meth:`OscarConfig.client_instruction`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from oscar_common.recipes import RECIPES
from oscar_common.training import PRECISIONS
from oscar_common.wire import SCHEMES

SCHEDULERS = ("ddim", "pndm", "default")


@dataclass(frozen=True)
class OscarConfig:
    # --- conditioning scheme and frozen models (paper defaults) ---
    scheme: str = "pooled"
    captioner: str = "Salesforce/blip-image-captioning-base"
    text_encoder: str = "openai/clip-vit-base-patch32"
    diffusion_model: str = "CompVis/stable-diffusion-v1-4"
    # --- synthesis ---
    scheduler: str = "ddim"  # the official code uses DDIM; "default" keeps the checkpoint's own
    guidance_scale: float = 7.5  # diffusers convention: eps_u + g (eps_c - eps_u); paper's s = g - 1
    num_inference_steps: int = 50
    images_per_class: int = 10
    image_resolution: int = 0  # 0: the diffusion model's native size (512 for SD 1.x)
    generation_batch_size: int = 8
    prompt_template: str = "{class_name}, {prompt}"
    inversion_tokens: int = 16
    inversion_steps: int = 1000
    inversion_lr: float = 0.1
    # --- classes and client-side encoding ---
    class_names: tuple[str, ...] = ()
    min_images_per_class: int = 1
    caption_batch_size: int = 16
    caption_max_tokens: int = 30
    # --- classifier trained on the synthetic set (ImageNet ResNet-18; recipes in oscar_common.recipes) ---
    classifier_pretrained: bool = True
    classifier_image_size: int = 224
    epochs: int = 0  # 0: the recipe's value (official 20, augmented 25)
    batch_size: int = 0  # 0: the recipe's value (official 256, augmented 32)
    lr: float = 0.0  # 0: the recipe's value (official 5e-4, augmented 1e-3)
    train_recipe: str = "official"  # official | augmented (oscar_common.recipes says why official)
    train_precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32
    decode_workers: int = -1  # processes decoding training images once; -1: from the CPU count
    # --- execution ---
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    min_clients: int = 2
    wait_for_clients_timeout: float = 300.0
    train_timeout: float = 3600.0
    evaluate_timeout: float = 600.0
    max_payload_bytes: int = 64 * 1024 * 1024
    run_dir: str = "runs"
    run_name: str = ""
    resume: bool = True
    simulation_data_dir: str = "demo/data"
    # --- benchmarks (oscar_common.benchmarks): run-wide defaults of every client's benchmark keys ---
    benchmark: str = ""
    benchmark_root: str = ""
    train_shots: int = 0
    test_shots: int = 0
    num_clients: int = 0
    alpha: float = 0.5
    split_dir: str = ""
    test_root: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        for name in ("images_per_class", "num_inference_steps",
                     "min_clients", "min_images_per_class", "generation_batch_size",
                     "caption_batch_size", "inversion_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_kebab(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_kebab(name)} must be >= 0 (0: the train-recipe's value), got {getattr(self, name)}")
        if self.train_recipe not in RECIPES:
            raise ValueError(f"train-recipe must be one of {sorted(RECIPES)}, got {self.train_recipe!r}")
        if self.train_precision not in PRECISIONS:
            raise ValueError(f"train-precision must be one of {PRECISIONS}, got {self.train_precision!r}")
        if self.decode_workers < -1:
            raise ValueError(f"decode-workers must be >= 0, or -1 for automatic, got {self.decode_workers}")
        if "{prompt}" not in self.prompt_template and self.scheme == "pooled":
            raise ValueError("prompt-template must contain '{prompt}' (the decoded client prompt)")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class-names has duplicates: {list(self.class_names)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "OscarConfig":
        """Build from Flower's run config (kebab-case keys). Unknown keys are kept in ``extra``."""
        kwargs, extra = parse_run_config(cls, run_config)
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return run_config_dict(self)

    def replace(self, **changes: Any) -> "OscarConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    @property
    def client_encoder_id(self) -> str:
        """The text encoder clients must use: CLIP for ``pooled``, SD's own for ``tokens``."""
        return self.text_encoder if self.scheme == "pooled" else self.diffusion_model

    def client_instruction(self) -> dict[str, Any]:
        """What a client needs to encode its data; sent in the train message's ConfigRecord."""
        return {
            "scheme": self.scheme,
            "captioner": self.captioner,
            "encoder-id": self.client_encoder_id,
            "class-names": list(self.class_names),
            "min-images-per-class": self.min_images_per_class,
            "caption-batch-size": self.caption_batch_size,
            "caption-max-tokens": self.caption_max_tokens,
            "seed": self.seed,
        }


def parse_run_config(cls: type, run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a Flower run config into a config dataclass's keyword arguments (values coerced to the
    fields' types) and the keys it does not know. Shared by every app of the project."""
    known = {f.name: f for f in fields(cls) if f.name != "extra"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in known:
            kwargs[name] = _coerce(name, known[name].type, value)
        else:
            extra[key] = value
    return kwargs, extra


def run_config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass back in run-config form (kebab-case keys, lists for tuples), e.g. for reports."""
    out = {}
    for f in fields(config):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        out[_kebab(f.name)] = list(value) if isinstance(value, tuple) else value
    return out


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Flower run config values are str/int/float/bool; turn them into the field's type."""
    kind = str(annotation)
    if "tuple" in kind:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return tuple(str(v) for v in value)
    if kind == "bool":
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"{_kebab(name)} must be true or false, got {value!r}")
        return bool(value)
    try:
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_kebab(name)} must be a number ({kind}), got {value!r}") from None
    return str(value)
