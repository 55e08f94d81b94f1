"""The synthesis stage: the uploads of a run directory -> prompts (``pooled``) -> synthetic images.

::

    oscar-synthesize RUN_DIR [--fresh] [--set key=value ...]
    python -m oscar_server.stages.synthesize RUN_DIR ...
    accelerate launch --multi_gpu --num_processes 4 -m oscar_server.stages.synthesize RUN_DIR

It reads the run directory only (``config.json``, the finished upload round, ``prompts.json`` if there)
and writes ``prompts.json``, ``synthetic/<class>/<client>__c<id>__<index>.png``, ``fidelity.json`` (each
image against the uploads; with ``generate-per-class`` the images not kept for training go to
``synthetic-set-aside/``: :mod:`oscar_server.stages.synthetic_selection`) and
``stages/synthesis-summary.json``. It can be rerun at any time: images that exist are skipped, never
rewritten, so a killed stage resumes where it stopped. Before it reuses anything it checks that the
settings that shape prompts and images are those recorded when the stage first ran
(:mod:`oscar_server.stages.fingerprint`); ``--fresh`` discards the stage's outputs instead.

Under ``accelerate launch`` or ``torchrun`` the images are shared out among the processes (one per GPU):
per-image seeds make the set the same whoever generates what. The main process decodes the prompts.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from oscar_common.config import OscarConfig
from oscar_common.devices import free_device_memory, peak_memory_gb, reset_peak_memory, resolve_device
from oscar_common.files import atomic_write_json
from oscar_common.models.loading import ModelNotFoundError, NoVisionTowerError, load_diffusion_pipeline
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.cli import on_first_process, run_stage_command
from oscar_server.stages.fidelity import FidelitySummary
from oscar_server.stages.fingerprint import StageSettingsChanged, check_stage_settings, forget_stage, stage_summary_path
from oscar_server.stages.generation import configure_cuda, generate_jobs, generation_dtype, prepare_generation
from oscar_server.stages.prompts import decode_prompts
from oscar_server.stages.summary import StageSummary
from oscar_server.stages.synthesis_jobs import SynthesisJob, plan_jobs, row_means, upload_rows
from oscar_server.stages.synthetic_selection import located, measure_and_select

log = logging.getLogger("oscar.synthesis")

STAGE = "synthesis"
BARRIER_TIMEOUT = timedelta(hours=3)
FRESH_HINT = "oscar-synthesize RUN_DIR --fresh"
# Errors that say what to do (said without a traceback by the command, and passed on to every process)
PLAIN_ERRORS = (StageSettingsChanged, FileNotFoundError, ModelNotFoundError, NoVisionTowerError)


@dataclass
class SynthesisSummary(StageSummary):
    """What the stage did; also ``stages/synthesis-summary.json``, so a multi-process launch can hand it back."""

    scheme: str
    images: int  # every generated image: clients x classes x generate-per-class (or images-per-class)
    generated: int  # written by this invocation (the rest existed already)
    seconds: float  # the whole stage, prompts and model loading included
    generation_seconds: float  # first image started to last image written, over all processes; no compiling
    images_per_second: float  # generated / generation_seconds
    processes: int
    devices: list[str]
    dtype: str
    batch_size: int
    compile_seconds: float  # torch.compile warm-up (slowest process); 0 without compiling
    prompts: list[dict[str, Any]] = field(default_factory=list)  # prompts.json's records (pooled)
    peak_memory_gb: float | None = None  # largest GPU memory peak of a process, inversion included; None off CUDA
    training_images: int | None = None  # kept for training (clients x classes x images-per-class); None: older
    fidelity: FidelitySummary | None = None  # None: a summary written before fidelity was measured
    stage: str = STAGE

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "SynthesisSummary":
        summary = super().from_dict(record)
        if isinstance(summary.fidelity, dict):
            summary.fidelity = FidelitySummary.from_dict(summary.fidelity)
        return summary


def summary_path(run_dir: RunDirectory) -> Path:
    return stage_summary_path(run_dir.root, STAGE)


def synthesis_settings(cfg: OscarConfig) -> dict[str, Any]:
    """The settings that shape prompts and images (resume safety). Not here: images-per-class and
    generate-per-class (image i is the same image whatever the count; the kept set is chosen again), batch
    size, processes and speed switches (they move pixels by at most float rounding)."""
    keys = ["scheme", "diffusion-model", "scheduler", "guidance-scale", "num-inference-steps",
            "image-resolution", "seed", "class-names"]
    if cfg.scheme == "pooled":
        keys += ["text-encoder", "prompt-template", "inversion-tokens", "inversion-steps", "inversion-lr"]
    values = cfg.to_dict()
    return {key: values[key] for key in keys}


def discard_synthesis(run_dir: RunDirectory) -> None:
    """``--fresh``: remove prompts, images (kept and set aside), fidelity, the settings record and the summary."""
    run_dir.prompts_path.unlink(missing_ok=True)
    run_dir.fidelity_path.unlink(missing_ok=True)
    shutil.rmtree(run_dir.synthetic_dir, ignore_errors=True)
    shutil.rmtree(run_dir.set_aside_dir, ignore_errors=True)
    summary_path(run_dir).unlink(missing_ok=True)
    forget_stage(run_dir.root, STAGE)
    log.info("discarded the synthesis outputs in %s", run_dir.root)


def synthesize_run(run_dir: RunDirectory, cfg: OscarConfig, *, fresh: bool = False) -> SynthesisSummary:
    """Run the stage in this process, or as this process's share of a torchrun / accelerate launch."""
    started = time.monotonic()
    # 1. Processes and devices: one per GPU under a launcher, else the configured device.
    device = resolve_device(cfg.device)
    # The processes wait for each other: for the main process's prompt inversion (minutes at DomainNet
    # scale), then for the slowest share. NCCL's default 10-minute timeout would cut that short.
    state = PartialState(cpu=device.type == "cpu", timeout=BARRIER_TIMEOUT)
    if state.num_processes > 1 and device.type == "cuda":
        device = state.device  # this process's GPU
    configure_cuda(tf32=cfg.tf32)
    reset_peak_memory(device)

    # 2. Resume safety, once, before anything is reused.
    def check_resume() -> None:
        if fresh:
            discard_synthesis(run_dir)
        check_stage_settings(run_dir.root, STAGE, synthesis_settings(cfg), fresh_hint=FRESH_HINT)

    on_first_process(state, check_resume, errors=PLAIN_ERRORS)

    # 3. Conditioning per upload row, in (client, class, prototype) order: prompts or per-token means.
    payloads = run_dir.accepted_uploads()
    rows = upload_rows(payloads)
    prompts: list[dict[str, Any]] = []
    if cfg.scheme == "pooled":
        with state.main_process_first():  # the main process decodes and saves; the others read prompts.json
            prompts = decode_prompts(rows, payloads, cfg, run_dir.prompts_path, device)
        conditioning: list[str] | torch.Tensor = [record["prompt"] for record in prompts]
    else:
        conditioning = row_means(rows, payloads)

    # 4. The images still missing, shared out among the processes.
    jobs = plan_jobs(rows, conditioning, class_names=cfg.class_names, images_per_class=cfg.generated_per_class,
                     base_seed=cfg.seed)
    pending = [job for job in jobs if located(run_dir, job) is None]
    log.info("synthesis: %d images, %d to generate on %d process(es)", len(jobs), len(pending), state.num_processes)
    state.wait_for_everyone()  # every process has listed what is missing before any image is written
    with state.split_between_processes(pending) as mine:
        local = _generate(mine, run_dir, cfg, device)

    # 5. The fidelity of every image and the training set (the main process; cheap next to generation).
    state.wait_for_everyone()
    fidelity = on_first_process(state, lambda: measure_and_select(run_dir, cfg, jobs, rows, payloads, device),
                                errors=PLAIN_ERRORS)

    # 6. One summary for all processes.
    shares = gather_object([local])
    working = [s for s in shares if s["generated"]]
    generation_seconds = (max(s["finished"] for s in working) - min(s["started"] for s in working)) if working else 0.0
    generated = sum(s["generated"] for s in shares)
    summary = SynthesisSummary(
        scheme=cfg.scheme, images=len(jobs), generated=generated, seconds=round(time.monotonic() - started, 2),
        generation_seconds=round(generation_seconds, 2),
        images_per_second=round(generated / generation_seconds, 4) if generation_seconds > 0 else 0.0,
        processes=state.num_processes, devices=[s["device"] for s in shares], dtype=local["dtype"],
        batch_size=max(s["batch_size"] for s in shares),
        compile_seconds=round(max(s["compile_seconds"] for s in shares), 2), prompts=prompts,
        peak_memory_gb=max((s["peak_memory_gb"] for s in shares if s["peak_memory_gb"] is not None), default=None),
        training_images=fidelity.kept, fidelity=fidelity)
    if state.is_main_process:
        atomic_write_json(summary_path(run_dir), summary.to_dict())
        log.info("synthesis done: %d images (%d generated now) in %.1f s, %.3f img/s on %s", summary.images,
                 summary.generated, summary.seconds, summary.images_per_second, ", ".join(summary.devices))
    state.wait_for_everyone()
    return summary


def _generate(jobs: list[SynthesisJob], run_dir: RunDirectory, cfg: OscarConfig,
              device: torch.device) -> dict[str, Any]:
    """This process's share; returns its numbers for the summary. No jobs: no model is loaded."""
    dtype = generation_dtype(cfg.dtype, device)
    share = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "generated": 0,
             "started": 0.0, "finished": 0.0, "batch_size": 0, "compile_seconds": 0.0,
             "peak_memory_gb": peak_memory_gb(device)}
    if not jobs:
        return share
    pipe = load_diffusion_pipeline(cfg.diffusion_model, device, dtype, scheduler=cfg.scheduler)
    prepared = prepare_generation(pipe, cfg, device, images=len(jobs))
    share["batch_size"], share["compile_seconds"] = prepared.batch_size, prepared.compile_seconds
    share["started"] = time.time()  # wall clock: comparable between the processes
    result = generate_jobs(pipe, jobs, run_dir.synthetic_dir, cfg, batch_size=prepared.batch_size)
    share["finished"], share["generated"] = time.time(), len(result.written)
    share["peak_memory_gb"] = peak_memory_gb(device)
    del pipe
    free_device_memory(device)
    return share


def main(argv: list[str] | None = None) -> None:
    run_stage_command(argv, prog="oscar-synthesize", description="OSCAR's synthesis stage: uploads -> prompts -> "
                      "synthetic images, resumable, on one or (under accelerate launch) several GPUs",
                      run=synthesize_run, plain_errors=PLAIN_ERRORS)


if __name__ == "__main__":
    main()
