"""The layering a newcomer relies on, from the bottom up:

- ``oscar_common`` (the wire contract, settings, data, models, training) imports no other OSCAR package;
- the client never imports the server, and importing a server stage (``oscar_server/stages``) imports no
  Flower module, not even through the project modules it uses: a stage is a plain command on a run directory;
- production code never reaches into the demo, the bench or the tests;
- no test module imports another.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
PRODUCTION = ("oscar_common", "oscar_client", "oscar_server", "oscar_deploy", "oscar_baselines")


def _imports(path: Path, on_import_only: bool = False) -> set[str]:
    """The modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks are for type checkers only);
    with ``on_import_only``, just those that importing it runs (not those inside functions)."""
    tree = ast.parse(path.read_text())
    skipped = (ast.FunctionDef, ast.AsyncFunctionDef) if on_import_only else ()
    type_only = {id(inner) for node in ast.walk(tree)
                 if (isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"))
                 or isinstance(node, skipped)
                 for statement in node.body for inner in ast.walk(statement)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from package import module`
    return names


def _modules(package: str) -> list[Path]:
    return sorted((PROJECT / package).rglob("*.py"))


def _module_file(name: str) -> Path | None:
    """The project file a dotted name is (a module, or a package's ``__init__``); None outside the project."""
    base = PROJECT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _reaches(path: Path) -> frozenset[str]:
    """Every module name that importing ``path`` imports, directly or through project modules."""
    seen: set[Path] = set()
    names: set[str] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in _imports(current, on_import_only=True):
            names.add(name)
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                found = _module_file(".".join(parts[:end]))
                if found is not None:
                    todo.append(found)
    return frozenset(names)


def test_production_code_never_imports_demo_bench_or_tests() -> None:
    offenders = [f"{path.relative_to(PROJECT)} imports {name}"
                 for package in PRODUCTION for path in _modules(package) for name in _imports(path)
                 if name.split(".")[0] in ("oscar_demo", "oscar_bench", "tests", "conftest")]
    assert offenders == []


def test_the_ground_floor_imports_no_other_oscar_package() -> None:
    offenders = [f"{path.relative_to(PROJECT)} imports {name}" for path in _modules("oscar_common")
                 for name in _imports(path) if name.startswith("oscar_") and name.split(".")[0] != "oscar_common"]
    assert offenders == []


def test_the_client_imports_nothing_from_the_server() -> None:
    offenders = [f"{path.relative_to(PROJECT)} imports {name}" for path in _modules("oscar_client")
                 for name in _imports(path) if name.split(".")[0] == "oscar_server"]
    assert offenders == []


def test_the_stages_import_no_flower_module_even_indirectly() -> None:
    offenders = [f"{path.relative_to(PROJECT)} reaches {name}" for path in _modules("oscar_server/stages")
                 for name in sorted(_reaches(path)) if name.split(".")[0] == "flwr"]
    assert offenders == []


def test_no_test_module_imports_another() -> None:
    tests = {path.stem for path in (PROJECT / "tests").rglob("test_*.py")}
    offenders = [f"{path.relative_to(PROJECT)} imports {name}" for path in (PROJECT / "tests").rglob("*.py")
                 for name in _imports(path) if name.split(".")[-1] in tests]
    assert offenders == []
