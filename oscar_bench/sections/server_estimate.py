"""The server's time on a DomainNet-scale run, from the rates measured above in this run.

6 clients x 90 classes x 10 images = 5,400 synthetic images; 540 (client, class) means inverted with the
run's inversion steps; every image embedded once for the synthesis fidelity (when the fidelity section
ran); 25 epochs over the 5,400 images. The one-time warm-up of the synthesis path
(compilation, and one batch of images) is counted once, on top: a slight overestimate.
"""

from __future__ import annotations

from typing import Any

from oscar_bench.context import Context
from oscar_bench.report import Column

COLUMNS = (Column("stage", "name"), Column("work", "work"), Column("rate", "rate"), Column("seconds", "seconds"),
           Column("minutes", "minutes"))

# Issue 8's target: 6 clients x 90 classes x 10 images, 25 epochs (whatever the run's defaults become).
CLIENTS, CLASSES, IMAGES_PER_CLASS, EPOCHS = 6, 90, 10, 25


def run(ctx: Context) -> dict[str, Any]:
    doc = ctx.doc
    images = CLIENTS * CLASSES * IMAGES_PER_CLASS
    means = CLIENTS * CLASSES
    epochs = EPOCHS

    def need(path: str) -> float:
        try:
            return doc.value(path)
        except KeyError:
            raise RuntimeError(f"needs {path}, which this run did not measure (run its section)") from None

    synth_rate = need("synthesis.project.img_per_s")
    warmup = need("synthesis.project.compile_seconds") + need("synthesis.project.warmup_seconds")
    # Inversion cost grows with the targets; the measured run had inversion.ours.targets of them.
    inversion = need("inversion.ours.seconds") * means / need("inversion.ours.targets")
    train_rate = need("training.project.img_per_s")
    stages = [("synthesis", "synthesis: warm-up / compile (once)", "1 run", None, warmup),
              ("synthesis_images", "synthesis: images", f"{images} images", synth_rate, images / synth_rate),
              ("inversion", f"inversion ({ctx.config.inversion_steps} steps)", f"{means} means", None, inversion),
              ("training", f"training ({epochs} epochs)", f"{epochs * images} images", train_rate,
               epochs * images / train_rate)]
    try:  # optional: a run without the fidelity section estimates without it
        fidelity_rate = doc.value("fidelity.files.img_per_s")
    except KeyError:
        fidelity_rate = None
    if fidelity_rate is not None:
        stages.insert(3, ("fidelity", "synthesis: fidelity (vision tower)", f"{images} images", fidelity_rate,
                          images / fidelity_rate))
    rows = [{"key": k, "name": n, "work": w, "rate": r, "seconds": s, "minutes": s / 60} for k, n, w, r, s in stages]
    total = sum(r["seconds"] for r in rows)
    rows.append({"key": "total", "name": "total", "work": "", "rate": None, "seconds": total, "minutes": total / 60})
    return {"rows": rows, "notes": [f"{CLIENTS} clients x {CLASSES} classes x {IMAGES_PER_CLASS} images; rates in "
                                    "img/s from this run's synthesis, fidelity and training sections; inversion scaled "
                                    "linearly to 540 means from the run's target count"]}
