"""The package's import arrows point down the flow: data never imports what comes after it, and no two modules of
one layer import each other. Read from the source (ast), so lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "selfdistill"

LOWER_THAN_DATA = ("selfdistill.data", "selfdistill.grading", "selfdistill.paths")
"""What the data layer may import from the package: itself, answer extraction and the cache paths."""


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] == "selfdistill"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_data_imports_nothing_that_comes_after_it() -> None:
    offending = {
        _module_name(path): sorted(name for name in _imports(path) if not name.startswith(LOWER_THAN_DATA))
        for path in sorted((PACKAGE / "data").glob("*.py"))
    }
    assert {module: names for module, names in offending.items() if names} == {}


def test_no_two_modules_import_each_other() -> None:
    graph = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}
    cycles = sorted((a, b) for a, targets in graph.items() for b in targets
                    if a < b and a in graph.get(b, set()) and not b.startswith(a + ".") and not a.startswith(b + "."))
    assert cycles == []
