"""``oscar-config``: check a run config before ``flwr run`` sends it, and merge a TOML file with overrides.

Flower refuses a run config key that ``[tool.flwr.app.config]`` does not declare with only
``[code: 15] Invalid run configuration.`` (from the SuperLink, without the key's name), and
``flwr run --run-config`` takes either a TOML file or ``key=value`` pairs, not both. So::

    oscar-config examples/demo-simulation.toml                       # check: every problem, named
    oscar-config examples/demo-simulation.toml "run-name='again'" --out run.toml   # merge, check, write
    flwr run . local --stream --run-config run.toml

Sources are read left to right (later ones win): TOML files, and ``key=value`` pairs with TOML values
(``epochs=3 class-names='cat,dog'``). Exit status 0 when the config is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

import tomli_w

from oscar_common.config import ConfigError, OscarConfig
from oscar_common.settings import declared_settings, key_listing


def known_keys() -> list[str]:
    return sorted(s.key for s in declared_settings(OscarConfig))


def load_run_config(sources: Sequence[str]) -> dict[str, Any]:
    """Merge TOML files and ``key=value`` pairs, left to right."""
    from flwr.common.config import parse_config_args  # Flower's own parser for key=value (TOML values)

    merged: dict[str, Any] = {}
    for source in sources:
        if "=" in source and not Path(source).is_file():
            try:
                merged.update(parse_config_args([source]))
            except Exception:  # noqa: BLE001 - Flower raises click's exception type with a generic text
                raise ValueError(_unparsable_pair(source)) from None
            continue
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{source} is neither a TOML file nor key=value")
        try:
            merged.update(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
    return merged


def _unparsable_pair(source: str) -> str:
    """Why ``key=value`` is not TOML, in the key's own terms: a number key takes a number, a text key quotes."""
    key, value = (part.strip() for part in source.split("=", 1))
    kinds = {s.key: s.kind for s in declared_settings(OscarConfig)}
    default = OscarConfig().to_dict().get(key)
    takes = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(kinds.get(key, ""))
    if takes is not None:
        return f"{key} takes {takes} (e.g. {key}={tomli_w.dumps({'v': default})[4:].strip()}), got {value!r}"
    return f"{source!r} is not key=value with a TOML value: text needs quotes, e.g. {key}='{value}'"


def run_config_problems(run_config: dict[str, Any]) -> list[str]:
    """Unknown keys (with the nearest known ones) and every value OscarConfig refuses."""
    keys = known_keys()
    problems = []
    for key in sorted(set(run_config) - set(keys)):
        close = difflib.get_close_matches(key, keys, n=2)
        problems.append(f"unknown key '{key}'" + (f": did you mean {' or '.join(repr(c) for c in close)}?" if close
                                                  else " (oscar-config --keys lists them)"))
    try:
        OscarConfig.from_run_config({k: v for k, v in run_config.items() if k in keys})
    except ConfigError as exc:
        problems += exc.problems
    except ValueError as exc:  # a value of the wrong type, before any range is checked
        problems.append(str(exc))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oscar-config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", help="TOML files and key=value pairs, later ones win")
    parser.add_argument("--out", type=Path, help="write the merged, checked run config to this TOML file")
    parser.add_argument("--keys", action="store_true",
                        help="list every run-config key: its type, default and meaning")
    args = parser.parse_args(argv)
    if args.keys:
        print(key_listing(declared_settings(OscarConfig)))
        return 0
    try:
        merged = load_run_config(args.sources)
    except (OSError, ValueError) as exc:
        print(f"oscar-config: {exc}", file=sys.stderr)
        return 1
    problems = run_config_problems(merged)
    if problems:
        print("oscar-config: the run config has problems:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    text = tomli_w.dumps(merged)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"oscar-config: {len(merged)} keys checked, written to {args.out}")
    else:
        print(f"# oscar-config: {len(merged)} keys checked\n{text}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
