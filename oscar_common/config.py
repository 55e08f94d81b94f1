"""One configuration object for the whole run.

Built from Flower's ``context.run_config`` (``[tool.flwr.app.config]`` in pyproject.toml, overridden
with ``flwr run --run-config``). Keys are kebab-case there and snake_case here; pyproject holds every
default once and :class:`OscarConfig` repeats it (a test keeps the two equal). The server builds it;
clients never read their own copy: they get what they need in the train instruction
(:meth:`OscarConfig.train_instruction`). Every value is checked here, before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping

from oscar_common.choices import (
    SCHEDULERS,
    SCHEMES,
    SWITCHES,
    TRAIN_PRECISIONS,
    TRAIN_RECIPES,
    TRANSPORT_DTYPES,
)
from oscar_common.config_values import parse_bool, parse_number

if TYPE_CHECKING:
    from oscar_common.wire import TrainInstruction


class ConfigError(ValueError):
    """Every rule a config breaks, one by one in ``problems`` (a rule's own text may hold a ';')."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid run config: " + "; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class OscarConfig:
    # --- conditioning scheme and frozen models (paper defaults) ---
    scheme: str = "pooled"
    captioner: str = "Salesforce/blip-image-captioning-base"
    text_encoder: str = "openai/clip-vit-base-patch32"
    diffusion_model: str = "CompVis/stable-diffusion-v1-4"
    # --- synthesis ---
    scheduler: str = "official"  # the official code's 50 UNet calls: SD-1.4's PNDM, its last 50 timesteps
    guidance_scale: float = 7.5  # diffusers convention: eps_u + g (eps_c - eps_u); paper's s = g - 1
    num_inference_steps: int = 50
    images_per_class: int = 10
    image_resolution: int = 0  # 0: the diffusion model's native size (512 for SD 1.x)
    generation_batch_size: int = 0  # 0: from free GPU memory (CUDA), a small fixed batch on CPU
    # --- how the server stages run (oscar_server.stage_launcher, oscar_server.generation) ---
    num_processes: str = "auto"  # "auto": one process per visible CUDA GPU (1 on CPU), or a number
    accelerate_config: str = ""  # an `accelerate config` file for multi-GPU launches; "": accelerate's default
    compile: str = "auto"  # torch.compile the UNet and VAE decoder: auto (CUDA only), true, false
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    fuse_qkv: bool = True  # fused attention QKV projections (diffusers' fuse_qkv_projections)
    png_writers: int = 4  # threads encoding and writing PNGs beside the GPU; 0: in the generating thread
    tf32: bool = True  # TensorFloat-32 matmuls on CUDA (inversion runs in float32)
    inversion_chunk_size: int = 0  # targets optimised at once; 0: from free GPU memory (CUDA), 256 on CPU
    prompt_template: str = "{class_name}, {prompt}"
    inversion_tokens: int = 16
    inversion_steps: int = 1000
    inversion_lr: float = 0.1
    # --- classes and client-side encoding ---
    class_names: tuple[str, ...] = ()
    min_images_per_class: int = 5  # a class of one image would upload that image's caption embedding
    caption_batch_size: int = 0  # 0: each client chooses from its device
    caption_max_tokens: int = 30
    blip2_prompt: str = "a photo of"  # the text a BLIP-2 captioner continues (the official code's; BLIP: none)
    # --- what clients share (docs/privacy.md) ---
    share_counts: bool = False
    prototypes_per_class: int = 1
    transport_dtype: str = "float32"
    dp_max_epsilon: float = 0.0  # > 0: every upload must be differentially private with at most this epsilon
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
    min_clients: int = 2  # nodes to wait for before the round starts (Flower's min_available_nodes)
    min_uploads: int = 0  # valid uploads the run needs; 0: min_clients (see required_uploads)
    wait_for_clients_timeout: float = 300.0
    # Messages (train, evaluate) outstanding at once; each reply sends the next. 0: all at once. Flower's
    # SuperLink scans its whole message store for every node it polls: N at once for N nodes costs N x N.
    max_in_flight: int = 16
    # Seconds without a new reply before the server stops waiting for the rest (every reply restarts it).
    train_timeout: float = 3600.0
    evaluate_timeout: float = 600.0
    max_payload_bytes: int = 0  # 0: exactly what a valid upload of this run can need (grows with classes)
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
        problems = config_problems(self)
        if problems:
            raise ConfigError(problems)

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
    def required_uploads(self) -> int:
        """Valid uploads without which the run fails: ``min-uploads``, or ``min-clients`` when that is 0."""
        return self.min_uploads or self.min_clients

    @property
    def client_encoder_id(self) -> str:
        """The text encoder clients must use: CLIP for ``pooled``, SD's own for ``tokens``."""
        return self.text_encoder if self.scheme == "pooled" else self.diffusion_model

    def train_instruction(self) -> "TrainInstruction":
        """What a client needs to encode its data; sent in the train message."""
        from oscar_common.wire import TrainInstruction  # Flower's records: only where messages are made

        return TrainInstruction(
            scheme=self.scheme, captioner=self.captioner, encoder_id=self.client_encoder_id,
            class_names=self.class_names, min_images_per_class=self.min_images_per_class,
            caption_batch_size=self.caption_batch_size, caption_max_tokens=self.caption_max_tokens,
            blip2_prompt=self.blip2_prompt,
            seed=self.seed, share_counts=self.share_counts, prototypes_per_class=self.prototypes_per_class,
            transport_dtype=self.transport_dtype, dp_max_epsilon=self.dp_max_epsilon,
        )


# (key, rule, check): each rule a user can read in the error message.
_RANGES: list[tuple[str, str, Any]] = [
    ("guidance_scale", ">= 1 (1 turns guidance off; the paper's s = g - 1 >= 0)", lambda v: v >= 1),
    ("num_inference_steps", ">= 1", lambda v: v >= 1),
    ("images_per_class", ">= 1", lambda v: v >= 1),
    ("image_resolution", "0 (native) or a multiple of 8 from 64", lambda v: v == 0 or (v >= 64 and v % 8 == 0)),
    ("generation_batch_size", ">= 0 (0: chosen from free GPU memory)", lambda v: v >= 0),
    ("png_writers", ">= 0 (0: PNGs written by the generating thread)", lambda v: v >= 0),
    ("inversion_chunk_size", ">= 0 (0: chosen from free GPU memory)", lambda v: v >= 0),
    ("inversion_tokens", "between 1 and 75 (CLIP's 77 positions less BOS and EOS)", lambda v: 1 <= v <= 75),
    ("inversion_steps", ">= 1", lambda v: v >= 1),
    ("inversion_lr", "> 0", lambda v: v > 0),
    ("min_images_per_class", ">= 1", lambda v: v >= 1),
    ("caption_batch_size", ">= 0 (0: each client chooses)", lambda v: v >= 0),
    ("caption_max_tokens", ">= 1", lambda v: v >= 1),
    ("prototypes_per_class", ">= 1", lambda v: v >= 1),
    ("dp_max_epsilon", ">= 0 (0: differential privacy not required)", lambda v: v >= 0),
    ("classifier_image_size", ">= 32", lambda v: v >= 32),
    ("epochs", ">= 0 (0: the train-recipe's value)", lambda v: v >= 0),
    ("batch_size", ">= 0 (0: the train-recipe's value)", lambda v: v >= 0),
    ("lr", ">= 0 (0: the train-recipe's value)", lambda v: v >= 0),
    ("decode_workers", ">= 0, or -1 (from the CPU count)", lambda v: v >= -1),
    ("seed", ">= 0", lambda v: v >= 0),
    ("min_clients", ">= 1", lambda v: v >= 1),
    ("min_uploads", ">= 0 (0: min-clients)", lambda v: v >= 0),
    ("max_in_flight", ">= 0 (0: every message at once)", lambda v: v >= 0),
    ("wait_for_clients_timeout", "> 0 seconds", lambda v: v > 0),
    ("train_timeout", "> 0 seconds", lambda v: v > 0),
    ("evaluate_timeout", "> 0 seconds", lambda v: v > 0),
    ("max_payload_bytes", ">= 0 (0: what a valid upload of this run can need)", lambda v: v >= 0),
    ("train_shots", ">= 0", lambda v: v >= 0),
    ("test_shots", ">= 0", lambda v: v >= 0),
    ("num_clients", ">= 0", lambda v: v >= 0),
    ("alpha", "> 0", lambda v: v > 0),
]


def config_problems(cfg: "OscarConfig") -> list[str]:
    """Every rule the config breaks, each naming its run-config key."""
    problems = []
    if cfg.scheme not in SCHEMES:
        problems.append(f"scheme must be one of {SCHEMES}, got {cfg.scheme!r}")
    if cfg.scheduler not in SCHEDULERS:
        problems.append(f"scheduler must be one of {SCHEDULERS}, got {cfg.scheduler!r}")
    if cfg.train_recipe not in TRAIN_RECIPES:
        problems.append(f"train-recipe must be one of {TRAIN_RECIPES}, got {cfg.train_recipe!r}")
    if cfg.train_precision not in TRAIN_PRECISIONS:
        problems.append(f"train-precision must be one of {TRAIN_PRECISIONS}, got {cfg.train_precision!r}")
    if cfg.transport_dtype not in TRANSPORT_DTYPES:
        problems.append(f"transport-dtype must be one of {TRANSPORT_DTYPES}, got {cfg.transport_dtype!r}")
    for name, rule, check in _RANGES:
        value = getattr(cfg, name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{_kebab(name)} must be a finite number, got {value}")
        elif not check(value):
            problems.append(f"{_kebab(name)} must be {rule}, got {value}")
    if cfg.num_processes != "auto" and not (cfg.num_processes.isdigit() and int(cfg.num_processes) >= 1):
        problems.append(f"num-processes must be 'auto' or a whole number >= 1, got {cfg.num_processes!r}")
    if cfg.compile.lower() not in SWITCHES:
        problems.append(f"compile must be one of {SWITCHES}, got {cfg.compile!r}")
    if "{prompt}" not in cfg.prompt_template and cfg.scheme == "pooled":
        problems.append("prompt-template must contain '{prompt}' (the decoded client prompt)")
    if cfg.dp_max_epsilon > 0 and cfg.prototypes_per_class > 1:
        problems.append("dp-max-epsilon cannot be combined with prototypes-per-class > 1: k-means assigns each "
                        "image by all the others, so one image can move several prototypes and the per-class "
                        "guarantee no longer holds (docs/privacy.md)")
    if cfg.min_uploads > cfg.min_clients:
        problems.append(f"min-uploads ({cfg.min_uploads}) must be at most min-clients ({cfg.min_clients}): the round "
                        "may start with only min-clients nodes connected")
    if len(set(cfg.class_names)) != len(cfg.class_names):
        problems.append(f"class-names has duplicates: {list(cfg.class_names)}")
    if cfg.run_name and cfg.run_name != cfg.run_name.strip("./") or "/" in cfg.run_name:
        problems.append(f"run-name must be a plain folder name, got {cfg.run_name!r}")
    return problems

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
        return parse_bool(value, _kebab(name))
    if kind in ("int", "float"):
        return parse_number(value, int if kind == "int" else float, _kebab(name))
    return str(value)
