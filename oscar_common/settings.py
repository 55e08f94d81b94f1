"""Settings declared once: each run-config and node-config key is a dataclass field made with
:func:`setting` (name and type from the field, default, allowed values and a one-line help from the call).

From those declarations come the parsing of what Flower hands over (:func:`parse_settings`), the check
of every value (:func:`rule_problems`), ``oscar-config --keys`` and the key tables of
docs/configuration.md, which ``python -m oscar_common.settings --markdown`` rewrites between their
marker comments (a unit test fails when the committed file differs).

Keys are kebab-case in the config (``guidance-scale``) and snake_case on the dataclass (``guidance_scale``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from oscar_common.config_values import parse_bool, parse_number

METADATA_KEY = "oscar-setting"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "python -m oscar_common.settings --markdown"


class SettingsError(ValueError):
    """Every rule a config breaks, one by one in ``problems`` (a rule's own text may hold a ';')."""

    def __init__(self, heading: str, problems: Sequence[str]) -> None:
        super().__init__(heading + "; ".join(problems))
        self.problems = list(problems)


# ------------------------------------------------------------------------------------------ rules

@dataclass(frozen=True)
class Rule:
    """What a value must be, in words a user reads in the error (``<key> must be <text>, got <value>``)."""

    text: str
    check: Callable[[Any], bool]


def at_least(low: float, note: str = "") -> Rule:
    return Rule(f">= {low}" + (f" ({note})" if note else ""), lambda value: value >= low)


def above(low: float, note: str = "") -> Rule:
    return Rule(f"> {low}" + (f" ({note})" if note else ""), lambda value: value > low)


def one_of(choices: Sequence[str], *, ignore_case: bool = False) -> Rule:
    allowed = tuple(choices)
    if ignore_case:
        return Rule(f"one of {allowed}", lambda value: value.lower() in allowed)
    return Rule(f"one of {allowed}", lambda value: value in allowed)


# ------------------------------------------------------------------------------------------ declaring

@dataclass(frozen=True)
class Declaration:
    """What :func:`setting` stores on a field beside its default."""

    help: str
    rule: Rule | None = None


def setting(default: Any, help: str, rule: Rule | None = None) -> Any:
    """A dataclass field that is a config key: its default, a one-line help and the rule its values obey.

    A default of ``None`` means "not set" (the key may be absent; an empty value also leaves it unset).
    """
    return field(default=default, metadata={METADATA_KEY: Declaration(help, rule)})


@dataclass(frozen=True)
class Setting:
    """One declared key, as the parser, the checks and the docs see it."""

    key: str
    name: str  # the dataclass field
    kind: str  # int, float, bool, str or list (comma-separated names)
    default: Any
    help: str
    rule: Rule | None
    optional: bool  # None allowed: "not set"

    def default_text(self) -> str:
        if self.default is None:
            return "(not set)"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, tuple):
            return ",".join(self.default) or '""'
        return '""' if self.default == "" else str(self.default)


def declared_settings(cls: type) -> list[Setting]:
    """The settings of a config dataclass (fields without :func:`setting` have no help): its own in
    declaration order, then those of its bases, nearest first."""
    depth: dict[str, int] = {}
    for level, klass in enumerate(cls.__mro__):
        for name in vars(klass).get("__annotations__", {}):
            depth.setdefault(name, level)
    settings = [_setting_of(f) for f in fields(cls) if f.init and f.name != "extra"]  # extra: unknown keys
    return sorted(settings, key=lambda s: depth[s.name])


def _setting_of(f: Field) -> Setting:
    annotation = str(f.type).replace(" ", "")
    optional = annotation.endswith("|None")
    base = annotation.removesuffix("|None")
    kind = "list" if base.startswith("tuple") else base
    if kind not in ("int", "float", "bool", "str", "list"):
        raise TypeError(f"setting {f.name} has type {f.type}; a setting is int, float, bool, str or a tuple of str")
    declaration = f.metadata.get(METADATA_KEY, Declaration(""))
    default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return Setting(f.name.replace("_", "-"), f.name, kind, default, declaration.help, declaration.rule, optional)


# ------------------------------------------------------------------------------------------ parsing

def parse_settings(cls: type, values: Mapping[str, Any], label: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Split config values (kebab-case keys, as Flower hands them over) into a config dataclass's keyword
    arguments, each coerced to its setting's type, and the keys it does not declare.

    ``label`` prefixes the key in a type error (``"node config: "``)."""
    declared = {s.key: s for s in declared_settings(cls)}
    kwargs: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, value in values.items():
        if key in declared:
            kwargs[declared[key].name] = coerce(declared[key], value, label)
        else:
            unknown[key] = value
    return kwargs, unknown


def coerce(setting_: Setting, value: Any, label: str = "") -> Any:
    """Flower's config values are str, int, float or bool (a TOML list for a list); turn one into the setting's type."""
    if value is None or (setting_.optional and value == ""):  # not set (None only from Python callers)
        return setting_.default
    name = label + setting_.key
    if setting_.kind == "list":
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return tuple(str(item) for item in value)
    if setting_.kind == "bool":
        return parse_bool(value, name)
    if setting_.kind in ("int", "float"):
        return parse_number(value, int if setting_.kind == "int" else float, name)
    return str(value)


def rule_problems(config: Any, label: str = "") -> list[str]:
    """Every declared rule the config's values break, each naming its key."""
    problems = []
    for s in declared_settings(type(config)):
        value = getattr(config, s.name)
        if value is None or s.rule is None:
            continue
        shown = repr(value) if isinstance(value, str) else value
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{label}{s.key} must be a finite number, got {value}")
        elif not s.rule.check(value):
            problems.append(f"{label}{s.key} must be {s.rule.text}, got {shown}")
    return problems


def settings_dict(config: Any) -> dict[str, Any]:
    """A config dataclass back in config form (kebab-case keys, lists for tuples), e.g. for reports."""
    out = {}
    for s in declared_settings(type(config)):
        value = getattr(config, s.name)
        out[s.key] = list(value) if isinstance(value, tuple) else value
    return out


class Validated:
    """Base of a settings dataclass: parsed with :func:`parse_settings`, every rule checked when it is built."""

    label: ClassVar[str] = ""  # before a key's name in a message, e.g. "node config: "

    def __post_init__(self) -> None:
        problems = self.config_problems()
        if problems:
            raise self.settings_error(problems)

    def config_problems(self) -> list[str]:
        return rule_problems(self, self.label)

    @classmethod
    def settings_error(cls, problems: list[str]) -> SettingsError:
        return SettingsError("", problems)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Any:
        """Built from config values; keys it does not declare are ignored."""
        kwargs, _ = parse_settings(cls, values, cls.label)
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------ listing

def key_listing(settings: Iterable[Setting]) -> str:
    """``oscar-config --keys``: one line per key, its type, default and help."""
    rows = [(s.key, s.kind, s.default_text(), s.help) for s in settings]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {h}" for k, t, d, h in rows)


def markdown_table(settings: Iterable[Setting]) -> str:
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for s in settings:
        allowed = s.rule.text if s.rule else ""
        default = s.default_text() if s.default is None else f"`{s.default_text()}`"
        lines.append(f"| `{s.key}` | {s.kind} | {default} | {_cell(allowed)} | {_cell(s.help)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Plain text in a table cell: a '|' would end the cell and '<name>' would read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "\\<")


def own_settings(cls: type) -> list[Setting]:
    """The settings ``cls`` declares itself, not those of its bases."""
    own = vars(cls).get("__annotations__", {})
    return [s for s in declared_settings(cls) if s.name in own]


def _tables() -> dict[str, str]:
    """Generated table name -> markdown. Imported here: the config modules import this one."""
    from oscar_common.config import OscarConfig
    from oscar_common.node_config import BenchmarkKeys, NodeConfig, PrivacyKeys

    return {"run-config": markdown_table(own_settings(OscarConfig)),
            "node-config": markdown_table(own_settings(NodeConfig)),
            "benchmark": markdown_table(declared_settings(BenchmarkKeys)),
            "privacy": markdown_table(declared_settings(PrivacyKeys))}


def render_docs(text: str) -> str:
    """``text`` with each generated table (between its two marker comments) rewritten from the declarations."""
    for name, table in _tables().items():
        start, end = _markers(name)
        head, found, rest = text.partition(start)
        _, found_end, tail = rest.partition(end)
        if not found or not found_end:
            raise ValueError(f"{DOCS.name} lacks the lines {start!r} and {end!r} around the {name} table")
        text = f"{head}{start}\n{table}\n{end}{tail}"
    return text


def _markers(name: str) -> tuple[str, str]:
    return (f"<!-- {name} table: generated by `{REGENERATE}` from the declarations; edit those -->",
            f"<!-- end of the generated {name} table -->")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oscar_common.settings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true",
                        help=f"rewrite the generated key tables of {DOCS.relative_to(DOCS.parents[1])}")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    DOCS.write_text(render_docs(DOCS.read_text()))
    print(f"wrote the generated key tables of {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
