"""The layering a newcomer relies on: production code never reaches into the demo, the benchmark or the
tests; the client never imports the server; no test module imports another."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
PRODUCTION = ("oscar_common", "oscar_client", "oscar_server", "oscar_deploy", "oscar_baselines")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(package: str) -> list[Path]:
    return sorted((PROJECT / package).rglob("*.py"))


def test_production_code_never_imports_demo_bench_or_tests() -> None:
    offenders = [f"{path.relative_to(PROJECT)} imports {name}"
                 for package in PRODUCTION for path in _modules(package) for name in _imports(path)
                 if name.split(".")[0] in ("oscar_demo", "oscar_bench", "tests", "conftest")]
    assert offenders == []


def test_the_client_imports_nothing_from_the_server() -> None:
    offenders = [f"{path.relative_to(PROJECT)} imports {name}" for path in _modules("oscar_client")
                 for name in _imports(path) if name.split(".")[0] == "oscar_server"]
    assert offenders == []


def test_no_test_module_imports_another() -> None:
    tests = {path.stem for path in (PROJECT / "tests").rglob("test_*.py")}
    offenders = [f"{path.relative_to(PROJECT)} imports {name}" for path in (PROJECT / "tests").rglob("*.py")
                 for name in _imports(path) if name.split(".")[-1] in tests]
    assert offenders == []
