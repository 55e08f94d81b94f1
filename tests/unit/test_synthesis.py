"""Classifier-free-guidance generation on the tiny Stable Diffusion pipeline (oscar_demo.tiny), and the
job list it works through."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import is_compiled_module
from PIL import Image

import oscar_server.stages.generation as generation
from oscar_common.models.loading import load_diffusion_pipeline
from oscar_common.wire import Upload
from oscar_demo.tiny import save_tiny_stable_diffusion
from oscar_server.stages.generation import generate_images as _generate_images
from oscar_server.stages.image_writer import PngWriter
from oscar_server.stages.synthesis_jobs import (
    SynthesisJob,
    UploadRow,
    image_seed,
    plan_jobs,
    prompt_class_name,
    synthetic_images,
    upload_rows,
)

STEPS = 3  # denoising steps: enough for several guided UNet calls, fast on CPU
GOLDEN_SEED = 7838518182834877815  # image_seed(0, "3", 17, 4), unchanged since the first release


def generate_images(pipe, jobs, out_dir, *, guidance_scale=7.5, num_inference_steps=STEPS, resolution=0,
                    batch_size=4, png_writers=2):
    """The generator with this file's test settings as defaults."""
    return _generate_images(pipe, jobs, out_dir, guidance_scale=guidance_scale,
                            num_inference_steps=num_inference_steps, resolution=resolution,
                            batch_size=batch_size, png_writers=png_writers)


def jobs_for(client: str, class_ids: list[int], class_names: tuple[str, ...], conditioning, images_per_class: int,
             base_seed: int = 0) -> list[SynthesisJob]:
    """Jobs for one client with one upload row per class."""
    rows = [UploadRow(client, c, 0, i) for i, c in enumerate(class_ids)]
    names = {c: n for c, n in zip(class_ids, class_names)}
    table = tuple(names.get(i, "unused") for i in range(max(class_ids) + 1))
    return plan_jobs(rows, conditioning, class_names=table, images_per_class=images_per_class, base_seed=base_seed)


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
        jobs = jobs_for("c1", [0, 1, 2], ("cat", "dog", "car"), ["cat, fur", "dog, bark", "car, red"], 1)
    else:
        jobs = jobs_for("c1", [0, 1, 2], ("cat", "dog", "car"), _embeds(sd, 2, k=3), 1)
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
    classes = tuple(f"class {i}" for i in range(345))  # DomainNet size
    jobs = []
    for client in ["0", "1", "2", "3", "4", "5"]:
        jobs += jobs_for(client, list(range(345)), classes, ["p"] * 345, 10, base_seed=0)
    assert len(jobs) == 6 * 345 * 10
    assert len({j.seed for j in jobs}) == len(jobs)
    assert len({j.relative_path for j in jobs}) == len(jobs)
    assert all(0 <= j.seed < 2**63 for j in jobs)
    # Golden values: a restart, another process or another release must rebuild exactly these seeds.
    assert image_seed(0, "3", 17, 4) == GOLDEN_SEED
    assert image_seed(1, "3", 17, 4) != GOLDEN_SEED


def _payload(name: str, class_ids: list[int]) -> Upload:
    return Upload(class_ids=np.array(class_ids), means=np.zeros((len(class_ids), 4), dtype=np.float32),
                  scheme="pooled", encoder_id="e", client_name=name, prototypes_per_class=3)


def test_upload_rows_follow_client_name_and_class_id_not_arrival_order():
    a, b = _payload("zeta", [0, 2]), _payload("alpha", [1, 2])
    expected = [UploadRow("alpha", 1, 0, 0), UploadRow("alpha", 2, 0, 1),
                UploadRow("zeta", 0, 0, 0), UploadRow("zeta", 2, 0, 1)]
    assert upload_rows([a, b]) == upload_rows([b, a]) == expected


def test_images_are_spread_over_the_prototypes_of_a_class():
    """Three means for class 1 ("k prototypes per class"): image i uses prototype i mod 3; file names keep
    the one-row layout."""
    rows = upload_rows([_payload("c", [0, 1, 1, 1])])
    assert [(r.class_id, r.prototype, r.row) for r in rows] == [(0, 0, 0), (1, 0, 1), (1, 1, 2), (1, 2, 3)]
    prompts = [f"row {r.row}" for r in rows]
    jobs = plan_jobs(rows, prompts, class_names=("cat", "dog"), images_per_class=4, base_seed=0)
    dog = [j for j in jobs if j.class_id == 1]
    assert [(j.index, j.prototype, j.prompt) for j in dog] == [
        (0, 0, "row 1"), (1, 1, "row 2"), (2, 2, "row 3"), (3, 0, "row 1")]
    assert [str(j.relative_path) for j in dog] == [f"dog/c__c0001__00{i}.png" for i in range(4)]
    assert [j.prompt for j in jobs if j.class_id == 0] == ["row 0"] * 4
    with pytest.raises(ValueError, match="3 prompts/embeddings for 4 upload rows"):
        plan_jobs(rows, prompts[:3], class_names=("cat", "dog"), images_per_class=1, base_seed=0)


def test_class_names_become_words_in_prompts():
    assert prompt_class_name("aircraft_carrier") == "aircraft carrier"
    assert prompt_class_name("The_Eiffel_Tower") == "The Eiffel Tower"
    assert prompt_class_name("cat") == "cat"


def test_relative_path_layout_and_sanitising():
    job = SynthesisJob("node/7", 12, "The Eiffel Tower", 3, seed=1, prompt="x")
    assert job.relative_path == Path("The_Eiffel_Tower") / "node_7__c0012__003.png"
    hostile = SynthesisJob("..", 1, "../etc", 0, seed=1, prompt="x").relative_path
    assert ".." not in hostile.parts and len(hostile.parts) == 2
    with pytest.raises(ValueError):
        SynthesisJob("c", 0, "a", 0, seed=1)  # neither prompt nor embeds


def test_synthetic_images_are_found_by_their_names(tmp_path):
    jobs = jobs_for("node/7", [3, 12], ("aircraft_carrier", "cat"), ["p", "q"], 2)
    for job in jobs:
        (tmp_path / job.relative_path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / job.relative_path).write_bytes(b"png")
    (tmp_path / "cat" / ".node_7__c0012__002.png.x1.tmp").write_bytes(b"unfinished")
    (tmp_path / "cat" / "notes.png").write_bytes(b"not ours")
    found = synthetic_images(tmp_path)
    assert [(i.client, i.class_id, i.index) for i in found] == [
        ("node_7", 3, 0), ("node_7", 3, 1), ("node_7", 12, 0), ("node_7", 12, 1)]
    assert found[2].path == tmp_path / "cat" / "node_7__c0012__000.png"


def test_duplicate_jobs_are_refused(tmp_path):
    job = SynthesisJob("c", 0, "a", 0, seed=1, prompt="x")
    with pytest.raises(ValueError, match="same file"):
        generate_images(None, [job, job], tmp_path)  # refused before the pipeline is touched


def test_existing_images_are_skipped_and_stale_temp_files_are_not(sd, tmp_path):
    jobs = jobs_for("c1", [0, 1], ("cat", "dog"), ["cat, x", "dog, y"], 2)
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


@pytest.mark.parametrize("png_writers", [0, 2])
def test_crash_while_writing_leaves_no_image(sd, tmp_path, monkeypatch, png_writers):
    """A PNG half-written when the process dies must not appear under its final name (whether this thread
    or a writer thread was writing it)."""
    job = SynthesisJob("c1", 0, "cat", 0, seed=5, prompt="cat, x")

    def crash(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt  # e.g. the server is stopped mid-write

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_images(sd, [job], tmp_path, png_writers=png_writers)
    assert not (tmp_path / job.relative_path).exists()
    assert list(tmp_path.rglob("*.tmp")) == []

    monkeypatch.undo()
    assert generate_images(sd, [job], tmp_path, png_writers=png_writers).written == [tmp_path / job.relative_path]


# ---------------------------------------------------------------------------- speed switches


def test_images_become_uint8_as_diffusers_pil_conversion_rounds():
    images = torch.tensor([0.0, 0.5, 1.0, 0.1, 0.998, 0.002]).view(1, 3, 1, 2)  # [B, C, H, W]
    # -> [B, H, W, C]; x * 255 rounded half to even: 127.5 -> 128, 25.5 -> 26, 254.49 -> 254
    assert generation.to_uint8_images(images).tolist() == [[[[0, 255, 254], [128, 26, 1]]]]


def test_png_writer_writes_in_threads_never_rewrites_and_raises_errors(tmp_path, monkeypatch):
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    existing = tmp_path / "a" / "old.png"
    existing.parent.mkdir()
    existing.write_bytes(b"finished before")
    with PngWriter(workers=2, max_pending_batches=1) as writer:
        for i in range(3):
            writer.submit([(tmp_path / "a" / f"{i}.png", red), (existing, red)])
    assert sorted(p.name for p in writer.written) == ["0.png", "1.png", "2.png"]
    assert existing.read_bytes() == b"finished before"
    assert np.asarray(Image.open(tmp_path / "a" / "2.png")).tolist() == red.tolist()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        with PngWriter(workers=2) as writer:
            writer.submit([(tmp_path / "b" / "0.png", red)])
    assert not (tmp_path / "b" / "0.png").exists()


class _FakePipe:
    """What auto_batch_size reads of a pipeline on a GPU."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.device, self.dtype, self.vae_scale_factor = torch.device("cuda", 0), dtype, 8
        self.unet = type("Unet", (), {"config": type("Config", (), {"sample_size": 64})()})()


@pytest.mark.parametrize("free_gb, resolution, dtype, expected", [
    (130, 0, torch.bfloat16, 32),  # an idle H200: the cap
    (10, 0, torch.bfloat16, 7),  # 0.8 * 10 GB / 1 GiB per 512x512 image
    (10, 256, torch.float16, 29),  # a quarter of the pixels
    (10, 512, torch.float32, 3),  # twice the bytes
    (0.1, 0, torch.float16, 1),  # never below one
])
def test_batch_size_from_free_gpu_memory(monkeypatch, free_gb, resolution, dtype, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gb * 1e9), int(141e9)))
    assert generation.auto_batch_size(_FakePipe(dtype), resolution) == expected


def test_cpu_batch_size_dtype_and_compile_defaults(sd, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert generation.auto_batch_size(sd, 0) == generation.CPU_BATCH_SIZE
    assert generation.generation_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert generation.generation_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert generation.generation_dtype("auto", cuda) == torch.float16
    assert generation.generation_dtype("float32", cuda) == torch.float32
    assert [generation.use_compile(s, cpu) for s in ("auto", "true", "false")] == [False, True, False]
    assert [generation.use_compile(s, cuda) for s in ("auto", "TRUE", "false")] == [True, True, False]


@pytest.fixture()
def fresh_sd(tmp_path_factory):
    """A pipeline of its own, for tests that change it."""
    model_dir = save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd-own"))
    return load_diffusion_pipeline(str(model_dir), torch.device("cpu"), torch.float32, scheduler="ddim")


def test_fused_qkv_projections_give_the_same_images(sd, fresh_sd, tmp_path):
    jobs = jobs_for("c1", [0, 1], ("cat", "dog"), ["cat, fur", "dog, bark"], 1)
    assert generation.prepare_pipeline(fresh_sd, fuse_qkv=True, compile=False, compile_mode="default",
                                       batch_size=2, resolution=0, guidance_scale=7.5) == 0.0
    processors = {type(p).__name__ for p in fresh_sd.unet.attn_processors.values()}
    assert processors == {"FusedAttnProcessor2_0"}
    generate_images(sd, jobs, tmp_path / "plain")
    generate_images(fresh_sd, jobs, tmp_path / "fused")
    for job in jobs:
        assert np.abs(_pixels(tmp_path / "plain" / job.relative_path)
                      - _pixels(tmp_path / "fused" / job.relative_path)).max() <= 1


def test_failed_compile_falls_back_to_the_plain_pipeline(fresh_sd, tmp_path, monkeypatch, caplog):
    compiled = []

    class Uncompilable(torch.nn.Module):  # what the pipeline reads of the UNet still answers; calls fail
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

        def forward(self, *args, **kwargs):
            raise RuntimeError("no C compiler")

    def broken_compile(fn, mode=None):
        compiled.append(mode)
        return Uncompilable(fn) if isinstance(fn, torch.nn.Module) else fn

    unet = fresh_sd.unet
    monkeypatch.setattr(torch, "compile", broken_compile)
    seconds = generation.prepare_pipeline(fresh_sd, fuse_qkv=False, compile=True, compile_mode="max-autotune",
                                          batch_size=2, resolution=0, guidance_scale=7.5)
    assert seconds == 0.0 and compiled == ["max-autotune", "max-autotune"]  # the UNet and the VAE decoder
    assert fresh_sd.unet is unet and "torch.compile failed (RuntimeError: no C compiler)" in caplog.text
    job = SynthesisJob("c1", 0, "cat", 0, seed=3, prompt="cat")
    assert generate_images(fresh_sd, [job], tmp_path).written == [tmp_path / job.relative_path]


def test_a_compiled_pipeline_compiles_once_and_draws_the_same_images(sd, fresh_sd, tmp_path, monkeypatch):
    """The CUDA default (compile=auto) taken on the CPU through torch.compile's real backend, TorchInductor
    (C++ kernels): the warm-up compiles the UNet and the VAE decoder once; the padded last batch, a batch
    of per-token conditioning (the tokens scheme) and a second call reuse those graphs (any recompilation
    is an error here), and the images are the eager pipeline's up to rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    seconds = generation.prepare_pipeline(fresh_sd, fuse_qkv=True, compile=True, compile_mode="default",
                                          batch_size=3, resolution=0, guidance_scale=7.5)
    try:
        assert seconds > 0 and is_compiled_module(fresh_sd.unet)
        assert counters["stats"]["unique_graphs"] == 2  # the UNet and vae.decode, nothing fell back
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        jobs = jobs_for("c1", [0, 1], ("cat", "dog"), ["cat, x", "dog, y"], 2)  # a batch of 3, then 1 (+2 padding)
        compiled = generate_images(fresh_sd, jobs, tmp_path / "compiled", batch_size=3)
        assert sorted(compiled.written) == sorted(tmp_path / "compiled" / j.relative_path for j in jobs)
        tokens_jobs = jobs_for("c2", [0, 1], ("cat", "dog"), _embeds(fresh_sd, 4, k=2), 1)  # 2, padded to 3
        assert len(generate_images(fresh_sd, tokens_jobs, tmp_path / "compiled", batch_size=3).written) == 2
        assert counters["stats"]["unique_graphs"] == 2
        generate_images(sd, jobs, tmp_path / "eager", batch_size=3)
        for job in jobs:
            assert np.abs(_pixels(tmp_path / "compiled" / job.relative_path)
                          - _pixels(tmp_path / "eager" / job.relative_path)).max() <= 1
    finally:
        torch._dynamo.reset()  # the compiled code and its guards go with the test
