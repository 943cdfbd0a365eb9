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


#: The layers, lowest first; a module may import its own layer and those below, never one above.
#: A module belongs to the layer of the longest prefix that names it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hmaml.errors", "hmaml.files", "hmaml.log", "hmaml.allocator", "hmaml.precision",
     "hmaml.plots", "hmaml.tasks"),
    ("hmaml.models",),
    ("hmaml.methods", "hmaml.data"),
    ("hmaml.config",),  # validates names that the layers below define
    ("hmaml.train",),  # the building blocks: engine, plan, build, run folder, protocol, tracking
    ("hmaml.predict",),
    ("hmaml.mlflow_model", "hmaml.mlflow_model_code"),
    ("hmaml.train.loop",),  # the training run, which ends by logging its model
    ("hmaml.sweep", "hmaml.tables", "hmaml.toy"),
    ("hmaml.bench",),  # measurements of everything: nothing but the commands imports them
    ("hmaml.commands", "hmaml.cli", "hmaml"),  # the package's API (hmaml.load_run) and CLI
)


def layer_of(module: str) -> int:
    matches = [(len(prefix), level) for level, prefixes in enumerate(LAYERS)
               for prefix in prefixes if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of tests/test_layout.py"
    return max(matches)[1]


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when c is
    a module, else as ``a.b``)."""
    return {name for name in imported_modules(path) if name in modules}


def upward_imports(modules: dict[str, Path]) -> list[str]:
    return sorted(f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
                  for name, path in modules.items() for dep in imports_of(path, modules)
                  if layer_of(dep) > layer_of(name))


def test_no_module_imports_upward() -> None:
    """Top-level and function-level imports alike: a lazy import is still a dependency."""
    assert not upward_imports(package_modules())


def test_no_import_cycles() -> None:
    """Within a layer modules may import each other, but never in a circle (a lazy import is
    how such a circle hides)."""
    modules = package_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name):], name]
            raise AssertionError(" -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            # a package's __init__ re-exporting its submodules is not a cycle with them
            if not dep.startswith(name + "."):
                visit(dep, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


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


def test_the_layers_catch_a_lower_module_importing_a_higher_one(tmp_path: Path) -> None:
    """The check is not vacuous: a data module importing the training loop is reported."""
    modules = package_modules()
    fake = tmp_path / "episodes.py"
    fake.write_text("from hmaml.train.loop import train\n")
    modules["hmaml.data.fake"] = fake
    assert upward_imports(modules) == [
        "hmaml.data.fake (layer 2) imports hmaml.train.loop (layer 7)"]
