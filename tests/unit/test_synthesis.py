"""Classifier-free-guidance synthesis on the tiny Stable Diffusion pipeline (oscar_demo.tiny)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oscar_common.models import load_diffusion_pipeline
from oscar_demo.tiny import save_tiny_stable_diffusion
from oscar_server.synthesis import (
    SynthesisJob,
    generate_images,
    image_seed,
    jobs_for_embeddings,
    jobs_for_prompts,
)

STEPS = 3  # denoising steps: enough for several guided UNet calls, fast on CPU


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    model_dir = save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))
    return load_diffusion_pipeline(str(model_dir), torch.device("cpu"), torch.float32, scheduler="ddim")


def _hidden(sd) -> int:
    return sd.text_encoder.config.hidden_size


def _embeds(sd, seed: int, k: int = 1) -> torch.Tensor:
    return torch.randn(k, 77, _hidden(sd), generator=torch.Generator().manual_seed(seed))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _record_guidance(sd, monkeypatch) -> dict[str, list]:
    """Record the UNet's conditioning and output for every call, and what scheduler.step receives."""
    calls: dict[str, list] = {"context": [], "eps": [], "model_output": []}

    def pre_hook(module, args, kwargs):
        calls["context"].append(kwargs["encoder_hidden_states"].detach().clone())

    def hook(module, args, kwargs, output):
        calls["eps"].append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())

    handles = [sd.unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
               sd.unet.register_forward_hook(hook, with_kwargs=True)]
    original = sd.scheduler.step

    @functools.wraps(original)  # keeps the signature the pipeline inspects for eta/generator
    def step(model_output, *args, **kwargs):
        calls["model_output"].append(model_output.detach().clone())
        return original(model_output, *args, **kwargs)

    monkeypatch.setattr(sd.scheduler, "step", step)
    calls["handles"] = handles
    return calls


@pytest.mark.parametrize("kind", ["prompt", "embeds"])
@pytest.mark.parametrize("g", [7.5, 3.0])
def test_classifier_free_guidance(sd, monkeypatch, tmp_path, kind, g):
    if kind == "prompt":
        job = SynthesisJob("c1", 0, "cat", 0, seed=123, prompt="cat, a photo of a cat")
    else:
        job = SynthesisJob("c1", 0, "cat", 0, seed=123, prompt_embeds=_embeds(sd, 1)[0])
    calls = _record_guidance(sd, monkeypatch)
    try:
        generate_images(sd, [job], tmp_path, guidance_scale=g, num_inference_steps=STEPS)
    finally:
        for h in calls["handles"]:
            h.remove()

    assert len(calls["eps"]) == len(calls["model_output"]) == STEPS
    empty, _ = sd.encode_prompt("", sd.device, 1, False)
    if kind == "prompt":
        cond, _ = sd.encode_prompt(job.prompt, sd.device, 1, False)
    else:
        cond = job.prompt_embeds[None]
    for context, eps, model_output in zip(calls["context"], calls["eps"], calls["model_output"]):
        # The pipeline batches [unconditional, conditional]: the empty prompt first, then the job's conditioning.
        assert context.shape[0] == 2
        torch.testing.assert_close(context[:1], empty)
        torch.testing.assert_close(context[1:], cond)
        eps_u, eps_c = eps.chunk(2)
        assert not torch.allclose(eps_u, eps_c)  # otherwise the check below would prove nothing
        torch.testing.assert_close(model_output, eps_u + g * (eps_c - eps_u))


@pytest.mark.parametrize("kind", ["prompt", "embeds"])
def test_image_depends_only_on_its_seed_not_on_batch(sd, tmp_path, kind):
    """Alone (batch of 1) or third in a batch of 3 with other jobs: the same image.

    Batched CPU matmuls may round differently from unbatched ones, so up to 1/255 per pixel is allowed;
    anything beyond that would mean the noise or conditioning leaked between images.
    """
    if kind == "prompt":
        jobs = jobs_for_prompts("c1", [0, 1, 2], ["cat", "dog", "car"], ["cat, fur", "dog, bark", "car, red"], 1, 0)
    else:
        jobs = jobs_for_embeddings("c1", [0, 1, 2], ["cat", "dog", "car"], _embeds(sd, 2, k=3), 1, 0)
    target = jobs[2]
    generate_images(sd, [target], tmp_path / "alone", num_inference_steps=STEPS, batch_size=1)
    generate_images(sd, jobs, tmp_path / "batched", num_inference_steps=STEPS, batch_size=3)
    alone = _pixels(tmp_path / "alone" / target.relative_path)
    batched = _pixels(tmp_path / "batched" / target.relative_path)
    assert np.abs(alone - batched).max() <= 1
    # ...and the other images of the batch really are different images.
    other = _pixels(tmp_path / "batched" / jobs[0].relative_path)
    assert np.abs(other - batched).mean() > 1


def test_different_embeds_and_seeds_give_different_images(sd, tmp_path):
    e = _embeds(sd, 3, k=2)
    a = SynthesisJob("c1", 0, "a", 0, seed=7, prompt_embeds=e[0])
    b = SynthesisJob("c1", 1, "b", 0, seed=7, prompt_embeds=e[1])  # same seed, other conditioning
    c = SynthesisJob("c1", 2, "c", 0, seed=8, prompt_embeds=e[0])  # same conditioning, other seed
    generate_images(sd, [a, b, c], tmp_path, num_inference_steps=STEPS, batch_size=3, resolution=32)
    pa, pb, pc = (_pixels(tmp_path / j.relative_path) for j in (a, b, c))
    assert pa.shape == (32, 32, 3)  # resolution is honoured
    assert np.abs(pa - pb).mean() > 0.5
    assert np.abs(pa - pc).mean() > 0.5


def test_realistic_job_list_has_unique_seeds_and_paths():
    classes = [f"class {i}" for i in range(345)]  # DomainNet size
    jobs = []
    for client in ["0", "1", "2", "3", "4", "5"]:
        jobs += jobs_for_prompts(client, range(345), classes, ["p"] * 345, 10, base_seed=0)
    assert len(jobs) == 6 * 345 * 10
    assert len({j.seed for j in jobs}) == len(jobs)
    assert len({j.relative_path for j in jobs}) == len(jobs)
    assert all(0 <= j.seed < 2**63 for j in jobs)
    # A restart rebuilds the same seeds; another base seed gives other ones.
    assert image_seed(0, "3", 17, 4) == image_seed(0, "3", 17, 4) != image_seed(1, "3", 17, 4)


def test_relative_path_layout_and_sanitising():
    job = SynthesisJob("node/7", 12, "The Eiffel Tower", 3, seed=1, prompt="x")
    assert job.relative_path == Path("The_Eiffel_Tower") / "node_7__c0012__003.png"
    hostile = SynthesisJob("..", 1, "../etc", 0, seed=1, prompt="x").relative_path
    assert ".." not in hostile.parts and len(hostile.parts) == 2
    with pytest.raises(ValueError):
        SynthesisJob("c", 0, "a", 0, seed=1)  # neither prompt nor embeds


def test_duplicate_jobs_are_refused(tmp_path):
    job = SynthesisJob("c", 0, "a", 0, seed=1, prompt="x")
    with pytest.raises(ValueError, match="same file"):
        generate_images(None, [job, job], tmp_path)  # refused before the pipeline is touched


def test_existing_images_are_skipped_and_stale_temp_files_are_not(sd, tmp_path):
    jobs = jobs_for_prompts("c1", [0, 1], ["cat", "dog"], ["cat, x", "dog, y"], 2, base_seed=0)
    first = generate_images(sd, jobs[:3], tmp_path, num_inference_steps=STEPS, batch_size=2)
    assert sorted(first.written) == sorted(tmp_path / j.relative_path for j in jobs[:3])
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first.written}

    # A crash mid-write leaves only a temp file: it must not count as the finished image.
    missing = tmp_path / jobs[3].relative_path
    stale = missing.parent / f".{missing.name}.crashed.tmp"
    stale.write_bytes(b"half a png")

    second = generate_images(sd, jobs, tmp_path, num_inference_steps=STEPS, batch_size=2)
    assert second.written == [missing]
    assert sorted(second.skipped_existing) == sorted(before)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before
    Image.open(missing).verify()  # a complete PNG
    # Our own writes leave no temp files behind.
    assert [p.name for p in tmp_path.rglob("*.tmp")] == [stale.name]


def test_crash_while_writing_leaves_no_image(sd, tmp_path, monkeypatch):
    """A PNG half-written when the process dies must not appear under its final name."""
    job = SynthesisJob("c1", 0, "cat", 0, seed=5, prompt="cat, x")

    def crash(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt  # e.g. the server is stopped mid-write

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_images(sd, [job], tmp_path, num_inference_steps=STEPS)
    assert not (tmp_path / job.relative_path).exists()
    assert list(tmp_path.rglob("*.tmp")) == []

    monkeypatch.undo()
    assert generate_images(sd, [job], tmp_path, num_inference_steps=STEPS).written == [tmp_path / job.relative_path]
