"""The run's report: ``report.json`` for machines, ``report.md`` for people, ``samples.png`` to look at."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from oscar_common.config import OscarConfig
from oscar_common.files import atomic_write_bytes, atomic_write_json
from oscar_server.run_dir import RunDirectory
from oscar_server.strategy import RunState


def build_report(cfg: OscarConfig, state: RunState, status: str, error: str | None = None) -> dict[str, Any]:
    clients = []
    for client in state.clients.values():
        evaluation = client.evaluation or {}
        clients.append({
            "node_id": client.node_id,
            "name": client.payload.client_name,
            "num_images": client.payload.num_images,
            "unreadable_images": client.payload.unreadable_images,
            "skipped_classes": client.payload.skipped_classes,
            "classes_uploaded": [cfg.class_names[c] for c in client.payload.class_ids.tolist()],
            "images_per_class": {cfg.class_names[c]: int(n) for c, n in
                                 zip(client.payload.class_ids.tolist(), client.payload.counts.tolist())},
            "payload_shape": client.payload.feature_shape,
            "upload_bytes": client.upload_bytes,
            "download_bytes": client.download_bytes,
            "test_accuracy": evaluation.get("accuracy"),
            "num_test": evaluation.get("num_test"),
            "per_class_accuracy": evaluation.get("per_class_accuracy"),
            "evaluation_error": evaluation.get("error"),
        })
    evaluated = [c for c in clients if c["test_accuracy"] is not None]
    n_test = sum(c["num_test"] for c in evaluated)
    synthesis = state.synthesis
    training = state.training
    return {
        "status": status,
        "error": error,
        "resumed": state.resumed,
        "config": cfg.to_dict(),
        "clients": clients,
        "rejected": state.rejected,
        "synthesis": None if synthesis is None else {
            "scheme": synthesis.scheme,
            "images": synthesis.images,
            "generated_this_run": synthesis.generated,
            "seconds": round(synthesis.seconds, 2),
            "prompts": synthesis.prompts if synthesis.scheme == "pooled" else None,
        },
        "training": None if training is None else {
            "epochs": training.epochs,
            "images": state.training_images,
            "seconds": round(training.seconds, 2),
            "train_accuracy": training.train_accuracy,
            "losses": [round(x, 5) for x in training.losses],
        },
        "accuracy": {
            "mean": sum(c["test_accuracy"] for c in evaluated) / len(evaluated) if evaluated else None,
            "weighted": (sum(c["test_accuracy"] * c["num_test"] for c in evaluated) / n_test) if n_test else None,
        },
        "communication": {
            "upload_bytes_total": sum(c["upload_bytes"] for c in clients),
            "download_bytes_total": sum(c["download_bytes"] for c in clients),
        },
        "timings_seconds": {k: round(v, 2) for k, v in state.timings.items()},
    }


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# OSCAR run report", "",
        f"Status: **{report['status']}**" + (f" — {report['error']}" if report["error"] else ""), "",
        f"Scheme `{cfg['scheme']}`, diffusion `{cfg['diffusion-model']}`, guidance {cfg['guidance-scale']} "
        f"(diffusers convention), {cfg['num-inference-steps']} steps, {cfg['images-per-class']} images per "
        "class per client.", "",
        "## Clients", "",
        client_table(report), "",
    ]
    acc = report["accuracy"]
    if acc["mean"] is not None:
        lines += [f"Mean accuracy **{acc['mean']:.4f}**, weighted by test images **{acc['weighted']:.4f}**.", ""]
    if report["rejected"]:
        lines += ["## Rejected or missing clients", "", "| node | name | reason |", "|---|---|---|"]
        lines += [f"| {r['node_id']} | {r.get('name') or '—'} | {_md(r['reason'])} |" for r in report["rejected"]]
        lines.append("")
    comm = report["communication"]
    lines += ["## Communication", "", "| direction | bytes |", "|---|---:|",
              f"| uploaded (all clients) | {comm['upload_bytes_total']:,} |",
              f"| downloaded (all clients) | {comm['download_bytes_total']:,} |", ""]
    syn, train = report["synthesis"], report["training"]
    if syn:
        lines += ["## Synthesis", "", f"{syn['images']} images ({syn['generated_this_run']} generated in this run) "
                  f"in {syn['seconds']:.1f}s.", ""]
        if syn["prompts"]:
            lines += ["| client | class | decoded prompt | cosine |", "|---|---|---|---:|"]
            lines += [f"| {p['client']} | {p['class_name']} | {_md(p['decoded'])} | {p['cosine']:.3f} |"
                      for p in syn["prompts"]]
            lines.append("")
    if train:
        lines += ["## Training", "", f"ResNet-18, {train['epochs']} epochs on {train['images']} synthetic images "
                  f"in {train['seconds']:.1f}s; final train accuracy {train['train_accuracy']:.4f}.", ""]
    return "\n".join(lines)


def client_table(report: dict[str, Any]) -> str:
    """The per-client table (Markdown), also what the demo prints."""
    rows = ["| client | node | images | classes | payload | upload bytes | test acc | test n |",
            "|---|---:|---:|---:|---|---:|---:|---:|"]
    for c in report["clients"]:
        acc = "—" if c["test_accuracy"] is None else f"{c['test_accuracy']:.4f}"
        rows.append(f"| {c['name']} | {c['node_id']} | {c['num_images']} | {len(c['classes_uploaded'])} | "
                    f"{'x'.join(map(str, c['payload_shape']))} | {c['upload_bytes']:,} | {acc} | "
                    f"{c['num_test'] if c['num_test'] is not None else '—'} |")
    return "\n".join(rows)


def render_samples(run_dir: RunDirectory, state: RunState, class_names: tuple[str, ...],
                   cell: int = 96) -> Path | None:
    """A grid of synthetic images: one row per class, one column per client (first image of each)."""
    if state.synthesis is None:
        return None
    first: dict[tuple[int, str], Path] = {}
    for job in state.synthesis.jobs:
        path = run_dir.synthetic_dir / job.relative_path
        if path.exists():
            first.setdefault((job.class_id, job.client), path)
    clients = sorted({client for _, client in first})
    rows = sorted({class_id for class_id, _ in first})
    if not clients:
        return None
    label_w, label_h = 110, 22
    grid = Image.new("RGB", (label_w + cell * len(clients), label_h + cell * len(rows)), "white")
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
    buffer = BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(run_dir.samples_png, buffer.getvalue())
    return run_dir.samples_png


def write_report(cfg: OscarConfig, run_dir: RunDirectory, state: RunState, status: str,
                 error: str | None = None) -> dict[str, Any]:
    report = build_report(cfg, state, status, error)
    atomic_write_json(run_dir.report_json, report)
    atomic_write_bytes(run_dir.report_md, render_markdown(report).encode())
    render_samples(run_dir, state, cfg.class_names)
    return report


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
