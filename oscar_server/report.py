"""The run's report: ``report.json`` for machines, ``report.md`` for people, ``samples.png`` and
``fidelity.png`` (:mod:`oscar_server.fidelity_report`) to look at.

``report.json`` is written last, atomically: once it exists with a final status, every other artefact
of the run (model, report.md, samples.png) is on disk. Status: ``completed`` (every accepted client
evaluated, nothing rejected), ``partial`` (the run went through, but some client was rejected or could not
evaluate: ``problems`` lists each), ``failed`` (the run stopped: ``error`` says why).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from oscar_common.conditioning import conditioning, conditioning_sentence
from oscar_common.config import OscarConfig
from oscar_common.files import atomic_write_bytes, atomic_write_json
from oscar_common.models.loading import stand_in_note
from oscar_server.fidelity_report import fidelity_json, fidelity_markdown, render_fidelity_png
from oscar_server.outcomes import ClientOutcome, Rejection, tally
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.synthesis_jobs import synthetic_images
from oscar_server.strategy import RunState

# samples.png stays readable with 100 clients: at most this many columns (clients) and rows (classes).
SAMPLE_COLUMNS = 12
SAMPLE_ROWS = 20


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders numbers in names by value: client-2 before client-10 (100 label-skew clients
    in name order read client-0, client-1, client-10, ..., client-19, client-2)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def run_status(clients: list[ClientOutcome], rejected: list[Rejection], error: str | None) -> tuple[str, list[str]]:
    """(status, problems): what completed and what did not, one line per client that fell short."""
    problems = [f"{r.sender}: upload rejected: {r.reason}" for r in rejected]
    problems += [f"{c.name}: no evaluation: {c.evaluation_error or 'no reply'}"
                 for c in clients if c.evaluation is None]
    if error is not None:
        return "failed", problems
    return ("partial" if problems else "completed"), problems


def build_report(cfg: OscarConfig, state: RunState, error: str | None = None) -> dict[str, Any]:
    """report.json's content: the run's typed results (:mod:`oscar_server.outcomes`, the stage summaries)
    as JSON values."""
    outcomes = sorted(state.clients.values(), key=lambda c: natural_key(c.name))
    status, problems = run_status(outcomes, state.rejected, error)
    totals = tally(outcomes, state.rejected)
    synthesis, training = state.synthesis, state.training
    models = {key: cfg.to_dict()[key] for key in ("captioner", "text-encoder", "diffusion-model")}
    stand_ins = {model_id: note for model_id in models.values() if (note := stand_in_note(model_id))}
    return {
        "status": status,
        "error": error,
        "problems": problems,
        "resumed": state.resumed,
        "models": {"ids": models, "stand_ins": stand_ins},
        "config": cfg.to_dict(),
        "clients": [client_json(client, cfg.class_names) for client in outcomes],
        "rejected": [asdict(rejection) for rejection in state.rejected],
        "synthesis": None if synthesis is None else {
            "scheme": synthesis.scheme,
            "images": synthesis.images,
            "training_images": synthesis.training_images,
            "generated_this_run": synthesis.generated,
            "seconds": round(synthesis.seconds, 2),
            "images_per_second": round(synthesis.images_per_second, 3),
            "compile_seconds": round(synthesis.compile_seconds, 1),
            "processes": synthesis.processes,
            "devices": synthesis.devices,
            "dtype": synthesis.dtype,
            "batch_size": synthesis.batch_size,
            "prompts": synthesis.prompts if synthesis.scheme == "pooled" else None,
        },
        "fidelity": None if synthesis is None else fidelity_json(synthesis.fidelity, stand_ins=bool(stand_ins)),
        "training": None if training is None else {
            "status": training.status,
            "recipe": training.recipe.get("name"),
            "epochs": training.epochs,
            "images": training.images,
            "unreadable_images": training.unreadable_images,
            "seconds": round(training.seconds, 2),
            "images_per_second": round(training.images_per_second, 1),
            "processes": training.processes,
            "devices": training.devices,
            "precision": training.precision,
            "best_epoch": training.best_epoch,
            "train_accuracy": training.train_accuracy,
            "losses": [round(x, 5) for x in training.losses],
        },
        "accuracy": {"mean": totals.mean_accuracy, "weighted": totals.weighted_accuracy},
        "communication": {"upload_bytes_total": totals.upload_bytes, "download_bytes_total": totals.download_bytes},
        "stages": stage_timings(state),
        "timings_seconds": {k: round(v, 2) for k, v in state.timings.items()},
    }


def client_json(client: ClientOutcome, class_names: tuple[str, ...]) -> dict[str, Any]:
    """One row of report.json's ``clients``."""
    upload, evaluation, shared = client.upload, client.evaluation, client.upload.shared
    return {
        "node_id": client.node_id,
        "name": client.name,
        "classes_uploaded": [class_names[c] for c in upload.classes],
        "prototypes_per_class": upload.prototypes_per_class,
        "payload_shape": upload.feature_shape,
        "upload_bytes": client.upload_bytes,
        "download_bytes": client.download_bytes,
        "differential_privacy": None if upload.dp is None else upload.dp.as_dict(),
        # only with share-counts (docs/privacy.md): otherwise these stay on the client
        "shared_counts": None if shared is None else {
            "num_images": shared.num_images, "unreadable_images": shared.unreadable_images,
            "skipped_classes": shared.skipped_classes,
            "images_per_row": None if upload.counts is None else upload.counts.tolist()},
        "test_accuracy": None if evaluation is None else evaluation.accuracy,
        "num_test": None if evaluation is None else evaluation.num_examples,
        "unreadable_test_images": None if evaluation is None else evaluation.unreadable_images,
        "per_class_accuracy": None if evaluation is None else {
            class_names[c]: round(a, 4) for c, a in sorted(evaluation.per_class.items())},
        "evaluation_error": client.evaluation_error,
    }


def stage_timings(state: RunState) -> list[dict[str, Any]]:
    """One row per server stage that ran: seconds, images, images per second, and where it ran."""
    synthesis, training = state.synthesis, state.training
    work = {
        "synthesis": None if synthesis is None else (synthesis.generated, synthesis.images_per_second,
                                                     synthesis.processes, synthesis.devices),
        "training": None if training is None else (training.trained_images * training.epochs_run,
                                                   training.images_per_second, training.processes, training.devices),
    }
    rows = []
    for stage in ("upload", "synthesis", "training", "evaluation"):
        if stage not in state.timings:
            continue
        images, rate, processes, devices = work.get(stage) or (None, None, None, None)
        rows.append({"stage": stage, "seconds": round(state.timings[stage], 2), "images": images,
                     "images_per_second": None if rate is None else round(rate, 2),
                     "processes": processes, "devices": devices})
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    status = f"Status: **{report['status']}**" + (f" — {report['error']}" if report["error"] else "")
    lines = ["# OSCAR run report", "", status, ""]
    lines += [f"- {problem}" for problem in report["problems"]]
    if report["problems"]:
        lines.append("")
    if report["models"]["stand_ins"]:
        lines += ["> **These models are tiny random-weight stand-ins**, not the real checkpoints: captions, prompts "
                  "and images are noise and accuracy is at chance level. "
                  f"({', '.join(f'`{m}`' for m in report['models']['stand_ins'])})", ""]
    lines += [
        f"Scheme `{cfg['scheme']}`, diffusion `{cfg['diffusion-model']}` (scheduler `{cfg['scheduler']}`), guidance "
        f"{cfg['guidance-scale']} (diffusers convention), {cfg['num-inference-steps']} steps, "
        f"{cfg['images-per-class']} images per class per client. {conditioning_sentence(conditioning(cfg))}", "",
        "## Clients", "", client_table(report), "",
    ]
    acc = report["accuracy"]
    if acc["weighted"] is not None:  # None: no client evaluated (or none had test images)
        lines += [f"Overall accuracy **{acc['weighted']:.4f}**: correct predictions / test images over all clients, "
                  "the official code's \"Overall\" (compare this one with the paper's Table I); unweighted mean "
                  f"over clients {acc['mean']:.4f}.", ""]
    if report["rejected"]:
        lines += ["## Rejected or missing clients", "", "| node | name | reason |", "|---|---|---|"]
        lines += [f"| {r['node_id']} | {r.get('name') or '—'} | {_md(r['reason'])} |" for r in report["rejected"]]
        lines.append("")
    comm = report["communication"]
    lines += ["## Communication", "", "| direction | bytes |", "|---|---:|",
              f"| uploaded (all clients) | {comm['upload_bytes_total']:,} |",
              f"| downloaded (all clients) | {comm['download_bytes_total']:,} |", ""]
    if report["stages"]:
        lines += ["## Stages", "", "| stage | seconds | images | images/s | processes | devices |",
                  "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {s['stage']} | {s['seconds']:.1f} | {_dash(s['images'])} | {_dash(s['images_per_second'])} | "
                  f"{_dash(s['processes'])} | {', '.join(s['devices'] or []) or '—'} |" for s in report["stages"]]
        lines.append("")
    syn, train = report["synthesis"], report["training"]
    if syn:
        kept = syn.get("training_images")
        kept_text = f", {kept} kept for training" if kept is not None and kept != syn["images"] else ""
        lines += ["## Synthesis", "", f"{syn['images']} images ({syn['generated_this_run']} generated in this run"
                  f"{kept_text}) in {syn['seconds']:.1f}s.", ""]
        if syn["prompts"]:
            lines += ["| client | class | decoded prompt | cosine |", "|---|---|---|---:|"]
            lines += [f"| {p['client']} | {p['class_name']} | {_md(p['decoded'])} | {p['cosine']:.3f} |"
                      for p in syn["prompts"]]
            lines.append("")
    lines += fidelity_markdown(report.get("fidelity"))
    if train:
        lines += ["## Training", "", f"ResNet-18, recipe `{train['recipe']}`, {train['epochs']} epochs on "
                  f"{train['images']} synthetic images ({train['unreadable_images']} unreadable skipped) in "
                  f"{train['seconds']:.1f}s ({train['precision']}); weights of epoch {train['best_epoch']} kept, "
                  f"train accuracy {train['train_accuracy']:.4f}.", ""]
    return "\n".join(lines)


def client_table(report: dict[str, Any]) -> str:
    """The per-client table (Markdown), also what the demo prints."""
    rows = ["| client | node | classes | payload | upload bytes | privacy | test acc | test n |",
            "|---|---:|---:|---|---:|---|---:|---:|"]
    for c in report["clients"]:
        acc = "—" if c["test_accuracy"] is None else f"{c['test_accuracy']:.4f}"
        dp = c["differential_privacy"]
        privacy = f"DP ε={dp['epsilon']:g}" if dp else "means only"
        if c["shared_counts"] is not None:
            privacy += " + counts"
        rows.append(f"| {c['name']} | {c['node_id']} | {len(c['classes_uploaded'])} | "
                    f"{'x'.join(map(str, c['payload_shape']))} | {c['upload_bytes']:,} | {privacy} | {acc} | "
                    f"{c['num_test'] if c['num_test'] is not None else '—'} |")
    return "\n".join(rows)


def render_samples(run_dir: RunDirectory, state: RunState, class_names: tuple[str, ...],
                   cell: int = 96) -> Path | None:
    """A grid of synthetic images: one row per class, one column per client (first image of each).

    With many clients or classes only the first ``SAMPLE_COLUMNS`` clients and ``SAMPLE_ROWS`` classes
    (by name, numbers in names by value, and by id) are drawn, and the picture says how many there are in all.
    """
    if state.synthesis is None:
        return None
    first: dict[tuple[int, str], Path] = {}
    for image in synthetic_images(run_dir.synthetic_dir):  # sorted: index 0 of each comes first
        first.setdefault((image.class_id, image.client), image.path)
    all_clients = sorted({client for _, client in first}, key=natural_key)
    all_rows = sorted({class_id for class_id, _ in first})
    if not all_clients:
        return None
    clients, rows = all_clients[:SAMPLE_COLUMNS], all_rows[:SAMPLE_ROWS]
    label_w, label_h = 110, 22
    footer = 22 if (len(clients), len(rows)) != (len(all_clients), len(all_rows)) else 0
    grid = Image.new("RGB", (label_w + cell * len(clients), label_h + cell * len(rows) + footer), "white")
    draw = ImageDraw.Draw(grid)
    for col, client in enumerate(clients):
        draw.text((label_w + col * cell + 4, 4), client[:14], fill="black")
    for row, class_id in enumerate(rows):
        draw.text((4, label_h + row * cell + cell // 2 - 6), class_names[class_id][:16], fill="black")
        for col, client in enumerate(clients):
            path = first.get((class_id, client))
            if path is not None:
                with Image.open(path) as image:
                    grid.paste(image.convert("RGB").resize((cell, cell)), (label_w + col * cell, label_h + row * cell))
    if footer:
        draw.text((4, label_h + cell * len(rows) + 4), f"showing {len(clients)} of {len(all_clients)} clients, "
                  f"{len(rows)} of {len(all_rows)} classes", fill="black")
    buffer = BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(run_dir.samples_png, buffer.getvalue())
    return run_dir.samples_png


def write_report(cfg: OscarConfig, run_dir: RunDirectory, state: RunState,
                 error: str | None = None) -> dict[str, Any]:
    """Every artefact first, report.json last: a final report.json means the run's files are complete."""
    report = build_report(cfg, state, error)
    render_samples(run_dir, state, cfg.class_names)
    if state.synthesis is not None:
        render_fidelity_png(run_dir)
    atomic_write_bytes(run_dir.report_md, render_markdown(report).encode())
    atomic_write_json(run_dir.report_json, report)
    return report


def status_line(report: dict[str, Any], run_dir: RunDirectory) -> str:
    """The last line of a run's log, for scripts: ``OSCAR status: <status> ...``."""
    mean = report["accuracy"]["mean"]
    detail = (report["error"] or "; ".join(report["problems"][:3])
              or (f"mean accuracy {mean:.4f}" if mean is not None else "no client evaluated"))
    return f"OSCAR status: {report['status']} — {detail} (report: {run_dir.report_json})"


def _dash(value: Any) -> str:
    return "—" if value is None else str(value)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
