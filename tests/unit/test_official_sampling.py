"""The default scheduler makes the UNet calls the official OSCAR code makes: 50 per image at 50 steps, at
the timesteps of its loop over ``scheduler.timesteps[-50:]``, with the same arithmetic (on the tiny SD)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import PNDMScheduler

from oscar_common.config import OscarConfig
from oscar_common.models.loading import load_diffusion_pipeline
from oscar_demo.tiny import save_tiny_stable_diffusion
from oscar_server.stages.fingerprint import StageSettingsChanged, check_stage_settings
from oscar_server.stages.generation import generate_images
from oscar_server.stages.synthesis_jobs import SynthesisJob
from oscar_server.stages.synthesize import synthesis_settings

CPU, F32 = torch.device("cpu"), torch.float32
DEFAULTS = OscarConfig()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


def official_timesteps(scheduler_config, steps: int) -> list[int]:
    """What the official loop iterates: the checkpoint's PNDM, ``timesteps[-steps:]`` (generation.py:79-80)."""
    scheduler = PNDMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps[-steps:]]


def unet_timesteps(pipe, run) -> list[int]:
    """The timestep of every UNet call ``run()`` makes."""
    seen: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_default_settings_make_the_official_unet_calls_per_image(model_dir: Path, tmp_path: Path) -> None:
    steps = DEFAULTS.num_inference_steps
    pipe = load_diffusion_pipeline(str(model_dir), CPU, F32, scheduler=DEFAULTS.scheduler)
    job = SynthesisJob(client="a", class_id=0, class_name="cat", index=0, seed=1, prompt="a cat")
    calls = unet_timesteps(pipe, lambda: generate_images(
        pipe, [job], tmp_path, guidance_scale=DEFAULTS.guidance_scale, num_inference_steps=steps, resolution=0,
        batch_size=1, png_writers=0))
    expected = official_timesteps(pipe.scheduler.config, steps)
    assert (steps, len(calls)) == (50, 50)  # one UNet call (a CFG pair) per step, as the official loop
    assert calls == expected and calls[:3] == [961, 961, 941] and calls[-1] == 1  # 981 never comes

    # diffusers' pipeline over PNDM's whole list: the 51 calls the official loop does not make
    full = load_diffusion_pipeline(str(model_dir), CPU, F32, scheduler="pndm")
    assert unet_timesteps(full, lambda: full("a cat", num_inference_steps=steps, output_type="latent")) == \
        [981] + expected


def test_the_pipeline_runs_the_official_loop_step_for_step(model_dir: Path) -> None:
    """Same latents as the official hand-written loop (ptp_utils.diffuse_reconstruction_step) from the same
    noise and conditioning: the cut list drives PNDM's own step exactly as that loop does."""
    steps, g = 12, DEFAULTS.guidance_scale
    pipe = load_diffusion_pipeline(str(model_dir), CPU, F32, scheduler=DEFAULTS.scheduler)
    cond, _ = pipe.encode_prompt("a cat", CPU, 1, False)
    uncond, _ = pipe.encode_prompt("", CPU, 1, False)
    noise = torch.randn(1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                        generator=torch.Generator().manual_seed(3))

    ours = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise.clone(), guidance_scale=g,
                num_inference_steps=steps, output_type="latent").images

    scheduler = PNDMScheduler.from_config(pipe.scheduler.config)  # the checkpoint's, as the official code
    scheduler.set_timesteps(steps)
    latents, context = noise.clone(), torch.cat([uncond, cond])
    with torch.no_grad():
        for t in scheduler.timesteps[-steps:]:
            eps_u, eps_c = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(eps_u + g * (eps_c - eps_u), t, latents).prev_sample
    torch.testing.assert_close(ours, latents)


def test_official_scheduler_refuses_a_config_it_cannot_follow(model_dir: Path) -> None:
    from oscar_common.models.official_scheduler import OfficialPNDMScheduler

    config = dict(PNDMScheduler.from_pretrained(model_dir, subfolder="scheduler").config, skip_prk_steps=False)
    with pytest.raises(ValueError, match="skip_prk_steps"):
        OfficialPNDMScheduler.from_checkpoint(config)


def test_a_synthetic_set_made_with_the_full_pndm_list_is_not_resumed_with_the_official_one(tmp_path: Path) -> None:
    old = DEFAULTS.replace(scheduler="pndm", class_names=("cat",))  # the default before the official calls
    check_stage_settings(tmp_path, "synthesis", synthesis_settings(old), fresh_hint="--fresh")
    with pytest.raises(StageSettingsChanged, match="scheduler: 'pndm' -> 'official'"):
        check_stage_settings(tmp_path, "synthesis", synthesis_settings(old.replace(scheduler="official")),
                             fresh_hint="--fresh")
