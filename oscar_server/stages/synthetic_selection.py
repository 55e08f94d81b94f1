"""After generation: the fidelity of every synthetic image, which images train, and ``fidelity.json``.

``pooled``: each image is embedded with the vision tower of the run's ``text-encoder`` (the CLIP whose
text tower made the uploads) and scored against the uploads (:mod:`oscar_server.stages.fidelity`). With
``generate-per-class`` above ``images-per-class``, the ``images-per-class`` images of each (client, class)
with the highest cosine stay in ``synthetic/`` (what training reads) and the others move to
``synthetic-set-aside/`` (same layout, never deleted); without it every generated image is kept.

``tokens``: the uploads are per-token states of Stable Diffusion's text encoder, not CLIP's joint space:
nothing is measured, ``fidelity.json`` says why, and every image is kept.

A rerun measures only images it has not measured (a row of ``fidelity.json`` is reused while its file's
size and modification time are unchanged; moving a file keeps both), so the kept set stays as it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from oscar_common.config import OscarConfig
from oscar_common.devices import free_device_memory
from oscar_common.files import atomic_write_json
from oscar_common.models.loading import ModelNotFoundError, NoVisionTowerError, load_clip_vision_encoder
from oscar_common.upload_rules import Upload
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.fidelity import (
    FidelityRow,
    FidelitySummary,
    class_means,
    ranked_for_keeping,
    score_images,
    summarise,
)
from oscar_server.stages.generation import generation_dtype
from oscar_server.stages.image_embedding import embed_image_files, embedding_batch_size
from oscar_server.stages.synthesis_jobs import SynthesisJob, UploadRow, row_means

log = logging.getLogger("oscar.synthesis")

MEASURED = ("cosine of each image's CLIP image embedding (vision tower of {encoder}) to its client's mean text "
            "embedding of its class; top-1: its own class is the nearest of its client's class means; domain "
            "retention: nearer its own client's mean of the class than every other client's (classes of >= 2 "
            "clients)")
NOT_MEASURED_TOKENS = ("not measured: with scheme 'tokens' the uploads are per-token states of Stable Diffusion's "
                       "text encoder, not points of CLIP's joint image-text space, so no image can be compared "
                       "with them")


def located(run_dir: RunDirectory, job: SynthesisJob) -> Path | None:
    """Where the job's image is: in the training set, set aside, or (None) not generated."""
    for folder in (run_dir.synthetic_dir, run_dir.set_aside_dir):
        if (folder / job.relative_path).exists():
            return folder / job.relative_path
    return None


def measure_and_select(run_dir: RunDirectory, cfg: OscarConfig, jobs: list[SynthesisJob], rows: list[UploadRow],
                       payloads: list[Upload], device: torch.device) -> FidelitySummary:
    """Score every image of ``jobs`` (all generated), keep the training set, write ``fidelity.json``."""
    started = time.monotonic()
    filtering = cfg.generated_per_class > cfg.images_per_class
    if cfg.scheme != "pooled":
        return _unmeasured(run_dir, jobs, NOT_MEASURED_TOKENS)
    try:
        scored = _scores(run_dir, cfg, jobs, rows, payloads, device)
    except (ModelNotFoundError, NoVisionTowerError) as exc:
        if filtering:  # the kept set depends on the figures: no figures, no run
            raise
        log.warning("synthesis fidelity not measured: %s", exc)
        return _unmeasured(run_dir, jobs, f"not measured: {exc}")
    by_pair: dict[tuple[str, int], list[FidelityRow]] = {}
    for row in scored:
        by_pair.setdefault((row.client, row.class_id), []).append(row)
    for group in by_pair.values():
        chosen = ranked_for_keeping(group)[:cfg.images_per_class] if filtering else group
        kept_indices = {row.index for row in chosen}
        for row in group:
            row.kept = row.index in kept_indices
    jobs_by_key = {(job.client, job.class_id, job.index): job for job in jobs}
    for row in scored:
        row.path = _arrange(run_dir, jobs_by_key[(row.client, row.class_id, row.index)], row.kept)
    note = MEASURED.format(encoder=cfg.text_encoder)
    atomic_write_json(run_dir.fidelity_path, {"measured": True, "note": note, "encoder": cfg.text_encoder,
                                              "images": [asdict(row) for row in scored]})
    summary = summarise(scored, note=note, encoder=cfg.text_encoder, seconds=time.monotonic() - started)
    log.info("synthesis fidelity: mean cosine %.3f, top-1 %.2f over %d kept images (%d generated) in %.1f s",
             summary.overall.mean_cosine or 0.0, summary.overall.top1 or 0.0, summary.kept, summary.generated,
             summary.seconds)
    return summary


def _scores(run_dir: RunDirectory, cfg: OscarConfig, jobs: list[SynthesisJob], rows: list[UploadRow],
            payloads: list[Upload], device: torch.device) -> list[FidelityRow]:
    """One row per job, in job order: reused from ``fidelity.json`` where the file is unchanged, else measured."""
    paths = [located(run_dir, job) for job in jobs]
    missing = [job.relative_path.as_posix() for job, path in zip(jobs, paths) if path is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} synthetic image(s) are missing after generation, e.g. {missing[0]}: "
                                f"run the stage again (oscar-synthesize {run_dir.root})")
    stamps = [_stamp(path) for path in paths]
    saved = _saved_rows(run_dir, cfg.text_encoder)
    previous = [saved.get((job.client, job.class_id, job.index)) for job in jobs]
    fresh = [i for i, (row, stamp) in enumerate(zip(previous, stamps)) if row is None or row.stamp != stamp]
    if fresh:
        means = class_means([(row.client, row.class_id) for row in rows], row_means(rows, payloads))
        processor, model = load_clip_vision_encoder(cfg.text_encoder, device, generation_dtype(cfg.dtype, device))
        try:
            embeds = embed_image_files([paths[i] for i in fresh], processor, model, embedding_batch_size(device))
        finally:
            del model
            free_device_memory(device)
        scores = score_images(embeds, [(jobs[i].client, jobs[i].class_id) for i in fresh], means)
        for i, score in zip(fresh, scores):
            job = jobs[i]
            previous[i] = FidelityRow(job.client, job.class_id, job.class_name, job.index, "", score.cosine,
                                      score.rank, score.top1, score.domain_retained, True, stamps[i])
        log.info("synthesis fidelity: measured %d image(s), reused %d", len(fresh), len(jobs) - len(fresh))
    return previous


def _arrange(run_dir: RunDirectory, job: SynthesisJob, kept: bool) -> str:
    """Put the image where it belongs (training set or set aside); its path relative to the run directory."""
    source = located(run_dir, job)
    target = (run_dir.synthetic_dir if kept else run_dir.set_aside_dir) / job.relative_path
    if source != target:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)  # a rename: the file's bytes and modification time stay
    return target.relative_to(run_dir.root).as_posix()


def _unmeasured(run_dir: RunDirectory, jobs: list[SynthesisJob], note: str) -> FidelitySummary:
    """No figures: every generated image is kept."""
    for job in jobs:
        _arrange(run_dir, job, kept=True)
    atomic_write_json(run_dir.fidelity_path, {"measured": False, "note": note, "encoder": None, "images": []})
    return FidelitySummary(measured=False, note=note, generated=len(jobs), kept=len(jobs))


def _saved_rows(run_dir: RunDirectory, encoder: str) -> dict[tuple[str, int, int], FidelityRow]:
    if not run_dir.fidelity_path.exists():
        return {}
    record: dict[str, Any] = json.loads(run_dir.fidelity_path.read_text())
    if record.get("encoder") != encoder:
        return {}
    return {(r["client"], r["class_id"], r["index"]): FidelityRow(**r) for r in record.get("images", [])}


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"
