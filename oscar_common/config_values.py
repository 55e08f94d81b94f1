"""Config values as Flower hands them over (str, int, float or bool: from a TOML file, ``--run-config`` or
``--node-config``), turned into what a setting needs, with an error that names the setting.

The one parser of declared settings (``oscar_common.settings``) uses them for the run config and the
node config alike, so that ``caption-cache = "no"`` and ``share-counts = "no"`` mean the same on both sides.
"""

from __future__ import annotations

from typing import Any

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")


def parse_bool(value: Any, name: str) -> bool:
    """A bool, or one of :data:`TRUE` / :data:`FALSE` in any case (a number 1 or 0 included)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def parse_number(value: Any, kind: type, name: str) -> int | float:
    """``value`` as ``int`` (a float only when whole: 2.0, never 1.5) or ``float``."""
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number ({kind.__name__}), got {value!r}") from None
