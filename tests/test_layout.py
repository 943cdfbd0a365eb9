"""The package's layering: which modules may import which (read from the source, not run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hmaml"


def imported_modules(path: Path) -> set[str]:
    """Every ``hmaml...`` module a file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] == "hmaml"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_only_the_commands_import_the_benchmarks() -> None:
    """Benchmarks sit on top of everything: a data or training module that imported one would
    depend on a measurement of itself."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name.startswith(("hmaml.bench", "hmaml.commands")):
            continue
        bad = sorted(m for m in imported_modules(path)
                     if m == "hmaml.bench" or m.startswith("hmaml.bench."))
        if bad:
            offenders.append(f"{name} imports {', '.join(bad)}")
    assert not offenders, offenders


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from hmaml.bench.train import hypermaml_step\n")
    assert "hmaml.bench.train" in imported_modules(module)
