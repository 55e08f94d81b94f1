"""The sampling the official OSCAR code runs, as a diffusers scheduler that the pipeline itself drives.

The official loop (obaidullahzaland/oscar, ``model/stable_diffusion/generation.py:79-80`` @4b6c7f5) calls
``set_timesteps(50)`` on Stable Diffusion 1.4's own ``PNDMScheduler`` (``skip_prk_steps``,
``steps_offset = 1``) and then steps through ``scheduler.timesteps[-50:]``, one UNet call each. With
``skip_prk_steps`` PNDM's list has one entry more than the steps asked for: PLMS starts with a two-call
step, so 50 steps give [981, 961, 961, 941, ..., 21, 1] (51 entries). diffusers' pipeline runs the whole
list (51 UNet calls per image); the official loop drops 981 and makes 50, at [961, 961, 941, ..., 1].
In diffusers 0.11.1, the version the official requirements.txt pins: ``schedulers/scheduling_pndm.py:166-176``
(the list) and ``pipelines/stable_diffusion/pipeline_stable_diffusion.py:501-523`` (the pipeline's loop).

:class:`OfficialPNDMScheduler` is PNDM with its list cut the same way, so that ``StableDiffusionPipeline``
makes exactly the official calls: same timesteps, same order, and the same ``step`` (PNDM's own, which
reads only its call counter and the timestep it is given). docs/official-code.md §1 traces what that
does to the noise levels.
"""

from __future__ import annotations

import torch
from diffusers import PNDMScheduler


class OfficialPNDMScheduler(PNDMScheduler):
    """PNDM (PLMS) over the last ``num_inference_steps`` entries of its timestep list: one UNet call per
    step, as the official OSCAR code samples. Only for configs with ``skip_prk_steps`` (SD 1.x): with
    Runge-Kutta warm-up steps the cut would leave PNDM's step counter out of step with its list."""

    @classmethod
    def from_checkpoint(cls, config: dict) -> "OfficialPNDMScheduler":
        """From the checkpoint's own scheduler config; refused now, not at the first image, if it is not
        an SD 1.x PNDM config."""
        _check(config)
        return cls.from_config(config)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        _check(self.config)
        super().set_timesteps(num_inference_steps, device=device)
        self.timesteps = self.timesteps[-num_inference_steps:]


def _check(config: dict) -> None:
    if not config.get("skip_prk_steps", False):
        raise ValueError("scheduler 'official' needs the checkpoint's scheduler to be PNDM with skip_prk_steps = "
                         "true (Stable Diffusion 1.x's); this one's config has none: choose scheduler pndm, ddim "
                         "or default")
