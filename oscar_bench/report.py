"""bench.json and bench.md: measured rows per section, ratios derived from them, targets.

Every section records rows of measured quantities (counts and seconds) plus the rates derived from them.
A ratio names the two recorded fields it divides (``section.row.field``) and is computed here, from the
document, after the rows are stored: no ratio is ever typed in. The document is rewritten after every
section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from oscar_common.files import atomic_write_bytes

SCHEMA = "oscar-bench/1"


@dataclass(frozen=True)
class Column:
    header: str
    field: str
    digits: int = 3  # significant digits for floats


@dataclass(frozen=True)
class RatioSpec:
    label: str
    numerator: str  # "section.row.field"
    denominator: str


@dataclass(frozen=True)
class Target:
    name: str
    metric: str  # "section.row.field", or "ratio:<numerator> / <denominator>"
    op: str  # ">=", "<=", "<"
    threshold: float
    unit: str


# Issue 8's "done when", on one H200-class GPU with the full-size architectures.
TARGETS = (
    Target("synthesis vs the official-style loop (same run)",
           "ratio:synthesis.project.img_per_s / synthesis.official.img_per_s", ">=", 10.0, "x"),
    Target("synthesis, end to end with PNGs, share of the measured bf16 rate",
           "synthesis.project.pct_of_peak", ">=", 50.0, "%"),
    Target("classifier training at 224", "training.project.img_per_s", ">=", 4000.0, "img/s"),
    Target("inversion of 540 means x 1000 steps", "inversion.ours.seconds", "<", 60.0, "s"),
    Target("DomainNet-scale server time (5,400 images, 25 epochs)", "server-estimate.total.minutes", "<=", 21.0,
           "min"),
    Target("client captioning, project path / bare generate", "client.captioning.pipeline_vs_bare", ">=", 0.9, "x"),
)
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


@dataclass
class Document:
    """The benchmark's results, as they accumulate."""

    meta: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    columns: dict[str, Sequence[Column]] = field(default_factory=dict)
    targets_apply: bool = False  # full-size architectures on CUDA: the only setting the targets speak of

    # ---------------------------------------------------------------- recording
    def record(self, name: str, result: dict[str, Any], ratio_specs: Sequence[RatioSpec] = ()) -> None:
        self.sections[name] = result
        for spec in ratio_specs:
            try:
                numerator, denominator = self.value(spec.numerator), self.value(spec.denominator)
            except KeyError:
                continue  # a part of the section that did not run (budget): no ratio, not a wrong one
            value = numerator / denominator if denominator else None
            self.ratios.append({"label": spec.label, "section": name, "numerator": spec.numerator,
                                "denominator": spec.denominator, "value": value})

    def value(self, path: str) -> float:
        """A recorded number by ``section.row.field`` (row = its ``key``); KeyError if absent or null."""
        return float(self._row(path)[_split(path)[2]])

    def _row(self, path: str) -> dict[str, Any]:
        section, key, name = _split(path)
        for row in self.sections.get(section, {}).get("rows", []):
            if row.get("key") == key and row.get(name) is not None:
                return row
        raise KeyError(path)

    def ratio(self, numerator: str, denominator: str) -> float:
        for entry in self.ratios:
            if entry["numerator"] == numerator and entry["denominator"] == denominator and entry["value"] is not None:
                return float(entry["value"])
        raise KeyError(f"{numerator} / {denominator}")

    def targets(self) -> list[dict[str, Any]]:
        rows = []
        for target in TARGETS:
            projected = False  # a figure computed from a cost model fitted to shorter measured runs
            try:
                if target.metric.startswith("ratio:"):
                    value = self.ratio(*(p.strip() for p in target.metric[len("ratio:"):].split("/")))
                else:
                    value = self.value(target.metric)
                    projected = bool(self._row(target.metric).get("projected"))
            except KeyError:
                value = None
            rows.append({"name": target.name, "metric": target.metric, "value": value, "op": target.op,
                         "threshold": target.threshold, "unit": target.unit, "projected": projected,
                         "met": None if value is None else bool(_OPS[target.op](value, target.threshold)),
                         "applies": self.targets_apply})
        return rows

    # ---------------------------------------------------------------- output
    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **self.meta, "sections": self.sections, "ratios": self.ratios,
                "targets": self.targets()}

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(self.to_json()), indent=2) + "\n"
        atomic_write_bytes(out_dir / "bench.json", text.encode())
        atomic_write_bytes(out_dir / "bench.md", self.markdown().encode())

    def markdown(self) -> str:
        meta = self.meta
        lines = [f"# oscar-bench: {meta['device']['name']} ({meta['mode']})", "",
                 f"torch {meta['versions']['torch']}, diffusers {meta['versions']['diffusers']}, transformers "
                 f"{meta['versions']['transformers']}; {meta['created_utc']}; elapsed "
                 f"{_fmt(meta.get('elapsed_seconds'))} s of a {_fmt(meta['budget_seconds'])} s budget.", ""]
        for name, result in self.sections.items():
            lines += [f"## {name}", ""]
            status = result.get("status")
            if status != "ok":
                lines += [f"**{status}**: {result.get('error') or result.get('reason') or ''}".rstrip(), ""]
            rows = result.get("rows") or []
            if rows:
                lines += _table(self.columns.get(name) or _generic_columns(rows), rows) + [""]
            ratios = [r for r in self.ratios if r["section"] == name]
            if ratios:
                lines += ["| ratio | value | = |", "|---|---|---|"]
                lines += [f"| {r['label']} | {_fmt(r['value'])} | `{r['numerator']}` / `{r['denominator']}` |"
                          for r in ratios] + [""]
            client_result = result.get("result")
            if isinstance(client_result, dict):
                lines += _client_tables(client_result) + [""]
            lines += [f"- {note}" for note in result.get("notes", [])]
            if result.get("notes"):
                lines.append("")
        lines += ["## targets", "",
                  "Targets are for the full-size architectures on one H200-class GPU"
                  + ("." if self.targets_apply else ": this run is not that, so 'met' is shown but does not count."),
                  "", "| target | value | target | met |", "|---|---|---|---|"]
        for t in self.targets():
            met = "—" if t["met"] is None else ("yes" if t["met"] else "no")
            if not t["applies"] and t["met"] is not None:
                met += " (n/a)"
            basis = " (projected, not measured)" if t["projected"] else ""
            lines.append(f"| {t['name']} | {_fmt(t['value'])} {t['unit']}{basis} | {t['op']} {_fmt(t['threshold'])} "
                         f"{t['unit']} | {met} |")
        return "\n".join(lines) + "\n"


def _split(path: str) -> tuple[str, str, str]:
    section, key, name = path.split(".")
    return section, key, name


def _table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(row.get(c.field), c.digits) for c in columns) + " |")
    return out


def _generic_columns(rows: Sequence[dict[str, Any]]) -> list[Column]:
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    return [Column(n, n) for n in names]


def _client_tables(result: dict[str, Any]) -> list[str]:
    """The client section's own dict (written by oscar_bench.client): its rows if any, else key/value."""
    rows = result.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        return _table(_generic_columns(rows), rows)
    scalars = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    return ["| field | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(0, digits - 1 - int(math.log10(abs(value))))}f}"
    return str(value).replace("|", "\\|")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
