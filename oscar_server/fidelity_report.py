"""The synthesis fidelity in the report: report.json's ``fidelity`` section, report.md's tables, fidelity.png.

The figures come from the synthesis stage's summary (:class:`~oscar_server.stages.fidelity.FidelitySummary`),
the picture from ``fidelity.json`` (every image, set-aside ones included). docs/fidelity.md says how to
read them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from oscar_common.files import atomic_write_bytes
from oscar_server.run_dir import RunDirectory
from oscar_server.stages.fidelity import FidelitySummary

LOWEST_CLASSES = 5  # (client, class) pairs named in report.md
PICTURE_PAIRS = 4  # fidelity.png: this many lowest and this many highest (client, class) pairs...
PICTURE_IMAGES = 3  # ...each with its best and its worst images


def fidelity_json(summary: FidelitySummary | None, stand_ins: bool) -> dict[str, Any] | None:
    """report.json's ``fidelity``: the stage's figures, the lowest pairs, and whether the models are stand-ins
    (then the figures are noise). None: the synthesis stage did not measure (a summary older than fidelity)."""
    if summary is None:
        return None
    return {**summary.to_dict(), "lowest_classes": [asdict(c) for c in summary.lowest_classes(LOWEST_CLASSES)],
            "stand_in_models": stand_ins}


def fidelity_markdown(section: dict[str, Any] | None) -> list[str]:
    """report.md's lines: a table per client, the lowest classes, what the figures are (or why there are none)."""
    if section is None:
        return []
    lines = ["## Synthesis fidelity", ""]
    if not section["measured"]:
        return lines + [f"Fidelity {section['note']}.", ""]
    if section["stand_in_models"]:
        lines += ["> The models are tiny random-weight stand-ins: these figures are noise.", ""]
    kept, generated = section["kept"], section["generated"]
    filtered = f" ({generated} generated; the {kept} of highest cosine kept)" if generated != kept else ""
    lines += [f"{kept} training images{filtered}. Measured: {section['note']}. Cosines of an image to a text "
              "embedding are small even for a good match: compare them between clients and classes "
              "(docs/fidelity.md).", "",
              "| client | images | mean cosine | top-1 retrieval | domain retention |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {c['client']} | {c['images']} | {_figure(c['mean_cosine'])} | {_figure(c['top1'])} | "
              f"{_domain(c)} |" for c in section["clients"]]
    overall, everything = section["overall"], section["overall_generated"]
    lines += [f"| **all** | {overall['images']} | {_figure(overall['mean_cosine'])} | {_figure(overall['top1'])} | "
              f"{_domain(overall)} |", ""]
    if generated != kept:
        lines += [f"Over all {generated} generated images: mean cosine {_figure(everything['mean_cosine'])}, top-1 "
                  f"{_figure(everything['top1'])}.", ""]
    if section["lowest_classes"]:
        lines += ["Lowest fidelity (client, class): " + ", ".join(
            f"{c['client']}/{c['class_name']} {_figure(c['mean_cosine'])}" for c in section["lowest_classes"]) + ".",
            ""]
    return lines


def render_fidelity_png(run_dir: RunDirectory, cell: int = 96) -> Path | None:
    """fidelity.png: for the lowest- and highest-fidelity (client, class) pairs, the best images then the
    worst (cosine under each). None when fidelity.json has no measured images."""
    if not run_dir.fidelity_path.exists():
        return None
    rows = json.loads(run_dir.fidelity_path.read_text()).get("images", [])
    if not rows:
        return None
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        pairs.setdefault((row["client"], row["class_name"]), []).append(row)
    by_mean = sorted(pairs, key=lambda key: sum(r["cosine"] for r in pairs[key]) / len(pairs[key]))
    chosen = list(dict.fromkeys(by_mean[:PICTURE_PAIRS] + by_mean[-PICTURE_PAIRS:]))
    label_w, text_h, columns = 150, 14, 2 * PICTURE_IMAGES
    picture = Image.new("RGB", (label_w + cell * columns, 20 + (cell + text_h) * len(chosen)), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((label_w + 4, 4), "best", fill="black")
    draw.text((label_w + PICTURE_IMAGES * cell + 4, 4), "worst", fill="black")
    for line, key in enumerate(chosen):
        ranked = sorted(pairs[key], key=lambda r: (-r["cosine"], r["index"]))
        shown = ranked[:PICTURE_IMAGES] + ranked[PICTURE_IMAGES:][-PICTURE_IMAGES:]
        top = 20 + line * (cell + text_h)
        draw.text((4, top + cell // 2 - 6), f"{key[0][:12]} / {key[1][:10]}", fill="black")
        for column, row in enumerate(shown):
            left = label_w + column * cell
            with Image.open(run_dir.root / row["path"]) as image:
                picture.paste(image.convert("RGB").resize((cell, cell)), (left, top))
            mark = "" if row["kept"] else " (set aside)"
            draw.text((left + 2, top + cell), f"{row['cosine']:.3f}{mark}", fill="black")
    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(run_dir.fidelity_png, buffer.getvalue())
    return run_dir.fidelity_png


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _domain(figures: dict[str, Any]) -> str:
    if figures["domain_retention"] is None:
        return "— (no class of >= 2 clients)"
    return f"{figures['domain_retention']:.3f} of {figures['domain_images']}"
