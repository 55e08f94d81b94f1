"""Settings declared once: the declarations drive parsing, checks, pyproject's defaults and the docs' tables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from oscar_client.policy import ClientPolicy
from oscar_common.config import OscarConfig
from oscar_common.data.datasets import BenchmarkError
from oscar_common.data.datasets.common import BenchmarkOptions
from oscar_common.node_config import NodeConfig
from oscar_common.node_settings import NodeSettings
from oscar_common.settings import (
    DOCS,
    REGENERATE,
    SettingsError,
    Validated,
    at_least,
    declared_settings,
    parse_settings,
    render_docs,
    setting,
)


def test_docs_tables_are_generated_from_the_declarations() -> None:
    committed = DOCS.read_text()
    assert render_docs(committed) == committed, (
        f"the key tables of docs/configuration.md differ from the declarations: run `{REGENERATE}` and commit")


def test_docs_without_the_markers_are_refused() -> None:
    with pytest.raises(ValueError, match="lacks the lines .* around the run-config table"):
        render_docs("# Configuration reference\n")


@pytest.mark.parametrize("config_class", [OscarConfig, NodeConfig])
def test_every_key_says_what_it_means(config_class: type) -> None:
    assert [s.key for s in declared_settings(config_class) if not s.help.strip()] == []


def test_the_node_config_has_one_parser_for_the_client_the_baselines_and_the_benchmarks(tmp_path: Path) -> None:
    # the same bad value is refused in the same words wherever a node config is read
    bad = {"data-dir": str(tmp_path), "benchmark-root": str(tmp_path), "benchmark": "domains", "dp-delta": 2}
    message = "node config: dp-delta must be in (0, 1), got 2.0"
    for read in (lambda: NodeSettings.from_context(bad, {}), lambda: ClientPolicy.from_node_config(bad),
                 lambda: BenchmarkOptions.from_config(bad)):
        with pytest.raises(ValueError, match=re.escape(message)):
            read()
    with pytest.raises(BenchmarkError):  # a benchmark's bad value stays a data problem of that node
        BenchmarkOptions.from_config({**bad, "dp-delta": 1e-5, "train-shots": "thirty"})
    # and the same value is read the same: text from a TOML string, numbers from numbers
    good = {"data-dir": str(tmp_path), "test-fraction": "0.3", "caption-cache": "no", "alpha": 2}
    assert NodeSettings.from_context(good, {}).test_fraction == 0.3 == NodeConfig.from_values(good).test_fraction
    assert ClientPolicy.from_node_config(good).caption_cache is False


def test_an_optional_key_left_empty_is_not_set() -> None:
    assert NodeConfig.from_values({"client-index": ""}).client_index is None
    assert NodeConfig.from_values({"client-index": "2"}).client_index == 2
    assert ClientPolicy.from_node_config({"dp-clip-norm": ""}).dp_clip_norm is None


def test_a_new_declaration_is_parsed_checked_and_listed() -> None:
    @dataclass(frozen=True)
    class Example(Validated):
        label = "example: "
        rounds: int = setting(3, "how many rounds", at_least(1))
        names: tuple[str, ...] = setting((), "comma-separated names")

    kwargs, unknown = parse_settings(Example, {"rounds": "4", "names": "a, b", "other": 1})
    assert Example(**kwargs) == Example(4, ("a", "b")) and unknown == {"other": 1}
    with pytest.raises(SettingsError, match=re.escape("example: rounds must be >= 1, got 0")):
        Example.from_values({"rounds": 0})
    with pytest.raises(ValueError, match=re.escape("example: rounds must be a number (int), got 'many'")):
        Example.from_values({"rounds": "many"})
    assert [(s.key, s.kind, s.default_text()) for s in declared_settings(Example)] == [
        ("rounds", "int", "3"), ("names", "list", '""')]
