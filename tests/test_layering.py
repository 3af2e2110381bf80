"""The package's layers, read from the source (every import, function-level ones too).

* No import cycle between fxprune's modules (packages' ``__init__`` aside: a package and
  its submodules may import each other).
* The data model (errors, groups, plans, reports, the slim file format, ...) imports no
  pass and no API module: the API builds on the data model, never the reverse.
"""
import ast
import importlib.util
import pathlib
from typing import Dict, Set

import pytest

PACKAGES = ("fxprune", "fxprune.passes", "fxprune.models", "fxprune.cli", "fxprune.criteria")
DATA_MODEL = ("errors", "group", "plan", "report", "repair_report", "slim_io", "registry",
              "ignore")


def _modules() -> Dict[str, pathlib.Path]:
    """``{dotted module name: source file}`` of every module of the installed packages."""
    out = {}
    for pkg in PACKAGES:
        root = pathlib.Path(importlib.util.find_spec(pkg).submodule_search_locations[0])
        out[pkg] = root / "__init__.py"
        for f in root.glob("*.py"):
            if f.name != "__init__.py":
                out[f"{pkg}.{f.stem}"] = f
    return out


def _imports(name: str, path: pathlib.Path, modules) -> Set[str]:
    """The modules of ``modules`` that ``name`` (its source at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name}


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph) -> list:
    """One import cycle between plain modules, or [] (depth-first search)."""
    plain = set(graph) - set(PACKAGES)
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m] & plain):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return []

    for m in sorted(plain):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_no_import_cycle_between_modules():
    _, graph = _graph()
    assert len(graph) > 50  # the packages were found
    cycle = _cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    graph = {"fxprune.a": {"fxprune.b"}, "fxprune.b": {"fxprune.c"},
             "fxprune.c": {"fxprune.a"}, "fxprune.d": set()}
    assert _cycle(graph) == ["fxprune.a", "fxprune.b", "fxprune.c", "fxprune.a"]


@pytest.mark.parametrize("name", DATA_MODEL)
def test_data_model_imports_no_pass_and_no_api(name):
    modules, graph = _graph()
    module = f"fxprune.{name}"
    assert module in modules
    bad = sorted(m for m in graph[module]
                 if m.startswith(("fxprune.passes", "fxprune.cli", "fxprune.api_",
                                  "fxprune.pipeline", "fxprune.criteria")))
    assert not bad, f"{module} imports {bad}"
