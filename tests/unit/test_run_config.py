"""oscar-config: every bad key and value named before `flwr run`, and a TOML file merged with overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from oscar_common.run_config import known_keys, load_run_config, main, run_config_problems

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo-simulation.toml"


def test_a_misspelled_key_is_named_with_the_nearest_ones(capsys: pytest.CaptureFixture) -> None:
    assert main([str(EXAMPLE), "imagess-per-class=2", "guidance-scale=-1"]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'imagess-per-class': did you mean 'images-per-class'" in err
    assert "guidance-scale must be >= 1" in err


def test_a_rule_whose_text_holds_a_semicolon_stays_one_problem(capsys: pytest.CaptureFixture) -> None:
    assert main([str(EXAMPLE), "guidance-scale=-1", "lr=-1"]) == 1
    bullets = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert bullets == ["  - guidance-scale must be >= 1 (1 turns guidance off; the paper's s = g - 1 >= 0), got -1.0",
                       "  - lr must be >= 0 (0: the train-recipe's value), got -1.0"]


@pytest.mark.parametrize("pair, message", [
    ("images-per-class=abc", "images-per-class takes a whole number (e.g. images-per-class=10), got 'abc'"),
    ("guidance-scale=high", "guidance-scale takes a number (e.g. guidance-scale=7.5), got 'high'"),
    ("share-counts=maybe", "share-counts takes true or false (e.g. share-counts=false), got 'maybe'"),
    ("run-name=mine", "is not key=value with a TOML value: text needs quotes, e.g. run-name='mine'"),
])
def test_a_value_that_is_not_toml_is_explained_by_the_keys_type(pair: str, message: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert main([str(EXAMPLE), pair]) == 1
    assert message in capsys.readouterr().err


def test_a_toml_file_and_overrides_merge_left_to_right(tmp_path: Path) -> None:
    out = tmp_path / "run.toml"
    assert main([str(EXAMPLE), "run-name='again'", "epochs=2", "--out", str(out)]) == 0
    merged = tomllib.loads(out.read_text())
    assert merged["run-name"] == "again" and merged["epochs"] == 2
    assert merged["class-names"] == tomllib.loads(EXAMPLE.read_text())["class-names"]


def test_the_example_configs_are_valid() -> None:
    for path in sorted(EXAMPLE.parent.glob("**/*.toml")):
        assert run_config_problems(load_run_config([str(path)])) == [], path


def test_keys_lists_every_key_with_its_type_default_and_meaning(capsys: pytest.CaptureFixture) -> None:
    assert main(["--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split(None, 3)[1:] for line in lines}
    assert set(rows) == set(known_keys()) and len(lines) == len(rows)
    assert rows["guidance-scale"] == ["float", "7.5", "diffusers convention eps_u + g (eps_c - eps_u); the paper's "
                                      "s is g - 1. 7.5 is what the official code passes; the paper states s = 7.5, "
                                      "which is 8.5 here"]
    assert rows["class-names"][:2] == ["list", '""'] and rows["run-name"][:2] == ["str", '""']


def test_sources_that_are_neither_file_nor_pair_are_refused(capsys: pytest.CaptureFixture) -> None:
    assert main(["no-such-file.toml"]) == 1
    assert "neither a TOML file nor key=value" in capsys.readouterr().err
    assert main(["class-names=a,b"]) == 1
    assert "text needs quotes, e.g. class-names='a,b'" in capsys.readouterr().err


def test_the_oscar_config_commands_in_readme_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `oscar-config <file in this repository> ...` line of README works when typed (shell quoting
    included); README once gave `run-name=mine`, which oscar-config refuses (text needs quotes)."""
    import shlex

    repo = EXAMPLE.parents[1]
    commands = [shlex.split(line.split("#")[0]) for line in (repo / "README.md").read_text().splitlines()
                if line.startswith("oscar-config ")]
    runnable = [argv[1:] for argv in commands if (repo / argv[1]).is_file()]
    assert runnable, "README shows no oscar-config command on a file of this repository"
    monkeypatch.chdir(tmp_path)  # --out files land here
    for argv in runnable:
        assert main([str(repo / argv[0]), *argv[1:]]) == 0, argv
