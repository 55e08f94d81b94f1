"""Resume safety: each server stage records the settings that shaped its outputs, and refuses to mix.

A resumed or re-run stage reuses what is in the run directory (prompts, images, training checkpoint).
That is only right when the settings that produced them are the ones in force now: a different
guidance scale or model would silently yield a synthetic set made half one way, half the other. So a
stage calls :func:`check_stage_settings` before it reuses anything; the first call records the
settings in ``<run dir>/stages/<stage>.json``, later calls compare and raise
:class:`StageSettingsChanged` naming every difference and how to start the stage afresh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from oscar_common.files import atomic_write_json


class StageSettingsChanged(RuntimeError):
    """A stage's saved outputs were made with other settings than the ones in force now."""


def stage_settings_path(run_root: Path, stage: str) -> Path:
    return Path(run_root) / "stages" / f"{stage}.json"


def stage_summary_path(run_root: Path, stage: str) -> Path:
    """What a stage's last run did (written by the stage, read by the strategy and the report)."""
    return Path(run_root) / "stages" / f"{stage}-summary.json"


def check_stage_settings(run_root: Path, stage: str, settings: Mapping[str, Any], *, fresh_hint: str) -> None:
    """Record ``settings`` for ``stage`` on first use; afterwards raise if any of them changed.

    ``fresh_hint`` tells the user how to discard this stage's outputs (e.g. a command with ``--fresh``).
    """
    path = stage_settings_path(run_root, stage)
    current = json.loads(json.dumps(dict(settings)))  # tuples -> lists, as they read back from disk
    if not path.exists():
        atomic_write_json(path, current)
        return
    saved = json.loads(path.read_text())
    changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    changed.update({key: (value, None) for key, value in saved.items() if key not in current})
    if changed:
        lines = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        raise StageSettingsChanged(
            f"the {stage} outputs in {run_root} were made with other settings ({lines}). Go back to the "
            f"settings recorded in {path}, choose another run-name, or discard this stage's outputs: {fresh_hint}"
        )


def forget_stage(run_root: Path, stage: str) -> None:
    """Drop the record (the caller has removed the stage's outputs)."""
    stage_settings_path(run_root, stage).unlink(missing_ok=True)
