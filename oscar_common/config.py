"""One configuration object for the whole run.

Built from Flower's ``context.run_config`` (``[tool.flwr.app.config]`` in pyproject.toml, overridden
with ``flwr run --run-config``). Keys are kebab-case there and snake_case here. Each key is declared once,
below, with :func:`~oscar_common.settings.setting` (default, allowed values, help); pyproject.toml lists
the same keys and defaults (a test keeps them equal) and docs/configuration.md's table is generated from
them. The benchmark keys come from :class:`~oscar_common.node_config.BenchmarkKeys`: run-wide defaults of
every node's own. The server builds it; clients never read their own copy: they get what they need in the
train instruction (:meth:`OscarConfig.train_instruction`). Every value is checked here, before anything runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from oscar_common.choices import (
    SCHEDULERS,
    SCHEMES,
    SWITCHES,
    TRAIN_PRECISIONS,
    TRAIN_RECIPES,
    TRANSPORT_DTYPES,
)
from oscar_common.models.clip_context import CLIP_CONTEXT_LENGTH, CLIP_PROMPT_TOKENS
from oscar_common.node_config import BenchmarkKeys
from oscar_common.settings import Rule, SettingsError, above, at_least, one_of, parse_settings, setting, settings_dict

if TYPE_CHECKING:
    from oscar_common.wire import TrainInstruction

_SECONDS = Rule("> 0 seconds", lambda v: v > 0)
_FROM_GPU_MEMORY = "0: chosen from free GPU memory"


class ConfigError(SettingsError):
    """Every rule a run config breaks, one by one in ``problems`` (a rule's own text may hold a ';')."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid run config: ", problems)


@dataclass(frozen=True)
class OscarConfig(BenchmarkKeys):
    # --- conditioning scheme and frozen models (paper defaults) ---
    scheme: str = setting(
        "pooled", "pooled: 512-d CLIP mean per class, decoded by prompt inversion; tokens: 77x768 per-token mean of "
                  "SD's text encoder, fed as prompt_embeds (what the official code does)", one_of(SCHEMES))
    captioner: str = setting(
        "Salesforce/blip-image-captioning-base",
        "client-side captioner: a BLIP or a BLIP-2 checkpoint (chosen from the checkpoint's config)")
    text_encoder: str = setting("openai/clip-vit-base-patch32",
                                "pooled scheme's text encoder (clients encode, the server inverts)")
    diffusion_model: str = setting("CompVis/stable-diffusion-v1-4",
                                   "server-side generator (and the tokens scheme's text encoder)")
    # --- synthesis ---
    scheduler: str = setting(
        "official", "official: the official code's sampling, SD-1.4's own PNDM over the last num-inference-steps "
                    "entries of its timestep list (50 UNet calls at 50 steps); pndm: the same PNDM over its whole "
                    "list, as diffusers runs it (51 calls); ddim; default: the checkpoint's own",
        one_of(SCHEDULERS))
    guidance_scale: float = setting(
        7.5, "diffusers convention eps_u + g (eps_c - eps_u); the paper's s is g - 1. 7.5 is what the official "
             "code passes; the paper states s = 7.5, which is 8.5 here",
        at_least(1, "1 turns guidance off; the paper's s = g - 1 >= 0"))
    num_inference_steps: int = setting(50, "denoising steps T", at_least(1))
    images_per_class: int = setting(10, "synthetic images per class per client", at_least(1))
    generate_per_class: int = setting(
        0, "images generated per class per client; above images-per-class, the images-per-class of highest "
           "fidelity are kept for training (pooled only; docs/fidelity.md)", at_least(0, "0: images-per-class"))
    image_resolution: int = setting(
        0, "generation size; 0: the model's native size (512 for SD 1.x)",
        Rule("0 (native) or a multiple of 8 from 64", lambda v: v == 0 or (v >= 64 and v % 8 == 0)))
    generation_batch_size: int = setting(
        0, "images per diffusion batch; 0: from free GPU memory (up to 32 at 512x512), 4 on CPU",
        at_least(0, _FROM_GPU_MEMORY))
    # --- how the server stages run (oscar_server.stages.launcher, oscar_server.stages.generation) ---
    num_processes: str = setting(
        "auto", "processes for the server stages: auto = one per visible CUDA GPU (1 on CPU), or N; more than one "
                "runs the stage through accelerate launch",
        Rule("'auto' or a whole number >= 1", lambda v: v == "auto" or (v.isdigit() and int(v) >= 1)))
    accelerate_config: str = setting("", "an `accelerate config` file for those launches; empty: accelerate's "
                                         "default config file, if any")
    compile: str = setting("auto", "torch.compile the UNet and VAE decoder (auto: on CUDA only); a failed compile "
                                   "falls back to the plain pipeline with a warning",
                           one_of(SWITCHES, ignore_case=True))
    compile_mode: str = setting("default", "torch.compile mode, e.g. max-autotune-no-cudagraphs")
    fuse_qkv: bool = setting(True, "fused attention QKV projections (diffusers' fuse_qkv_projections)")
    png_writers: int = setting(4, "threads that encode and write PNGs while the GPU generates",
                               at_least(0, "0: PNGs written by the generating thread"))
    tf32: bool = setting(True, "TensorFloat-32 for float32 matmuls on CUDA (prompt inversion)")
    inversion_chunk_size: int = setting(
        0, "prompt-inversion targets optimised at once (results do not depend on it); 0: from free GPU memory, "
           "256 on CPU", at_least(0, _FROM_GPU_MEMORY))
    prompt_template: str = setting(
        "{class_name}, {prompt}", "pooled: how the decoded prompt is combined with the class name (in words: "
                                  "aircraft_carrier becomes \"aircraft carrier\"); {prompt} alone conditions on the "
                                  "uploaded embedding only")
    inversion_tokens: int = setting(16, "hard-prompt inversion: tokens per prompt (Wen et al. 2023)",
                                    Rule(f"between 1 and {CLIP_PROMPT_TOKENS} (CLIP's {CLIP_CONTEXT_LENGTH} positions less BOS and EOS)",
                                         lambda v: 1 <= v <= CLIP_PROMPT_TOKENS))
    inversion_steps: int = setting(1000, "hard-prompt inversion: optimisation steps", at_least(1))
    inversion_lr: float = setting(0.1, "hard-prompt inversion: learning rate (Wen et al. 2023)", above(0))
    # --- classes and client-side encoding ---
    class_names: tuple[str, ...] = setting((), "comma-separated class list (required); class ids on the wire "
                                               "index it")
    min_images_per_class: int = setting(
        5, "classes with fewer local training images are not uploaded (docs/privacy.md); a class of one image "
           "would upload that image's caption embedding", at_least(1))
    caption_batch_size: int = setting(0, "client-side captioning batch", at_least(0, "0: each client chooses"))
    caption_max_tokens: int = setting(30, "longest caption, in tokens", at_least(1))
    blip2_prompt: str = setting("a photo of", "the text a BLIP-2 captioner continues (the official code's "
                                              "captioner's prompt; empty: none); BLIP captioners take no prompt")
    # --- what clients share (docs/privacy.md) ---
    share_counts: bool = setting(False, "ask clients for label counts (they may refuse)")
    prototypes_per_class: int = setting(1, "k > 1: k k-means prototypes per class", at_least(1))
    transport_dtype: str = setting("float32", "float16 halves the upload (tokens: 77 x 768 x 2 bytes per class)",
                                   one_of(TRANSPORT_DTYPES))
    dp_max_epsilon: float = setting(0.0, "every upload must be differentially private with at most this epsilon",
                                    at_least(0, "0: differential privacy not required"))
    # --- classifier trained on the synthetic set (ImageNet ResNet-18; recipes in oscar_common.training.recipes) ---
    classifier_pretrained: bool = setting(True, "start ResNet-18 from ImageNet weights (official code); needs them "
                                                "in $TORCH_HOME (preflight checks)")
    classifier_image_size: int = setting(224, "classifier input size", at_least(32))
    epochs: int = setting(0, "training epochs (official: 20, official-openimage: 20, augmented: 25)",
                          at_least(0, "0: the train-recipe's value"))
    batch_size: int = setting(0, "training batch (official: 256, official-openimage: 32, augmented: 32)",
                              at_least(0, "0: the train-recipe's value"))
    lr: float = setting(0.0, "learning rate (official: 5e-4, official-openimage: 5e-4, augmented: 1e-3)",
                        at_least(0, "0: the train-recipe's value"))
    train_recipe: str = setting(
        "official", "official: the official code's current recipe for DomainNet and NICO++; official-openimage: the "
                    "same for OpenImage (batch 32, random crops and flips); augmented: its earlier recipe "
                    "(docs/official-code.md)", one_of(TRAIN_RECIPES))
    train_precision: str = setting("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 (also on a CPU, where "
                                           "it is slower); fp32", one_of(TRAIN_PRECISIONS))
    decode_workers: int = setting(-1, "processes that decode the synthetic images once before training",
                                  Rule(">= 0, or -1 (from the CPU count)", lambda v: v >= -1))
    # --- execution ---
    seed: int = setting(0, "splits, inversion, per-image diffusion seeds, training", at_least(0))
    device: str = setting("auto", "server device")
    dtype: str = setting("auto", "server dtype; auto: bf16 (or fp16) on CUDA, float32 on CPU")
    min_clients: int = setting(2, "nodes to wait for before the upload round starts (Flower's min_available_nodes)",
                               at_least(1))
    min_uploads: int = setting(0, "valid uploads the run needs, fewer fails it (at most min-clients): lower it to go "
                                  "on when some of the nodes waited for send bad uploads",
                               at_least(0, "0: min-clients"))
    wait_for_clients_timeout: float = setting(300.0, "seconds to wait for min-clients nodes to connect", _SECONDS)
    # Flower's SuperLink scans its whole message store for every node it polls: N at once for N nodes costs N x N.
    max_in_flight: int = setting(16, "train / evaluate messages outstanding at once, the next sent as each reply "
                                     "comes in; raise it for many real SuperNodes working in parallel "
                                     "(docs/scale.md)", at_least(0, "0: every message at once"))
    train_timeout: float = setting(3600.0, "seconds without a new upload before the server stops waiting for the "
                                           "rest (every reply restarts the wait)", _SECONDS)
    evaluate_timeout: float = setting(600.0, "seconds without a new evaluation before the server stops waiting for "
                                             "the rest (every reply restarts the wait)", _SECONDS)
    max_payload_bytes: int = setting(0, "larger uploads are rejected (grows with classes and scheme)",
                                     at_least(0, "0: what a valid upload of this run can need"))
    run_dir: str = setting("runs", "where run directories go: <run-dir>/<run-name or run-<id>>")
    run_name: str = setting("", "this run's folder name in run-dir; empty: run-<Flower run id>. Name the run to be "
                                "able to resume it",
                            Rule("a plain folder name", lambda v: v == v.strip("./") and "/" not in v))
    resume: bool = setting(True, "a named run whose upload round finished (and that did not finish) is continued "
                                 "instead of asking clients again")
    simulation_data_dir: str = setting("demo/data", "local simulation only: one sub-folder per client")
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def config_problems(self) -> list[str]:
        """Every rule the config breaks, each naming its run-config key."""
        return super().config_problems() + _further_problems(self)

    @classmethod
    def settings_error(cls, problems: list[str]) -> ConfigError:
        return ConfigError(problems)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "OscarConfig":
        """Build from Flower's run config (kebab-case keys). Unknown keys are kept in ``extra``."""
        kwargs, extra = parse_settings(cls, run_config)
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return settings_dict(self)

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

    @property
    def generated_per_class(self) -> int:
        """Images the synthesis stage generates per (client, class): ``generate-per-class``, 0 meaning
        ``images-per-class``."""
        return self.generate_per_class or self.images_per_class

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


def _further_problems(cfg: OscarConfig) -> list[str]:
    """The rules a declaration cannot state: between keys, or in their own words."""
    problems = []
    if "{prompt}" not in cfg.prompt_template and cfg.scheme == "pooled":
        problems.append("prompt-template must contain '{prompt}' (the decoded client prompt)")
    if cfg.dp_max_epsilon > 0 and cfg.prototypes_per_class > 1:
        problems.append("dp-max-epsilon cannot be combined with prototypes-per-class > 1: k-means assigns each "
                        "image by all the others, so one image can move several prototypes and the per-class "
                        "guarantee no longer holds (docs/privacy.md)")
    if cfg.min_uploads > cfg.min_clients:
        problems.append(f"min-uploads ({cfg.min_uploads}) must be at most min-clients ({cfg.min_clients}): the round "
                        "may start with only min-clients nodes connected")
    if 0 < cfg.generate_per_class < cfg.images_per_class:
        problems.append(f"generate-per-class ({cfg.generate_per_class}) must be 0 or at least images-per-class "
                        f"({cfg.images_per_class}): the stage keeps images-per-class of the images it generates")
    if cfg.generate_per_class > cfg.images_per_class and cfg.scheme != "pooled":
        problems.append(f"generate-per-class > images-per-class needs scheme 'pooled': with {cfg.scheme!r} the "
                        "uploads are not in CLIP's image space, so there is no fidelity to choose the images by "
                        "(docs/fidelity.md); set generate-per-class = 0")
    if len(set(cfg.class_names)) != len(cfg.class_names):
        problems.append(f"class-names has duplicates: {list(cfg.class_names)}")
    return problems
