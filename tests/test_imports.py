"""The repository's own modules import one another without a circle.

In a circle (``a`` imports ``b`` and ``b`` imports ``a``, directly or through others) neither module can be read,
tested or moved alone, and which one runs first decides what the other finds half-made. The graph is read from the
source with :mod:`ast`, so the check imports nothing and takes a fraction of a second.

Every import statement counts: at a module's top, under ``if TYPE_CHECKING:`` and inside a function, since each
says that one module needs the other. Importing ``a.b`` also runs ``a/__init__.py``, but that implicit edge is left
out (a package whose ``__init__`` imports its own modules is the usual layout, not a circle); an explicit
``from a import name`` is an edge to ``a``'s ``__init__``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_fedhog", "benchmarks", "recipes", "tests")
INSTALLED = ("lightning_fedhog", "recipes")
"""The packages ``pip install`` makes importable from anywhere (``[tool.setuptools.packages.find]``)."""
SCRIPTS = ("benchmarks.throughput", "benchmarks.partial_backprop", "tests.apps.train",
           "tests.apps.compressed_round_peak")
"""Programs run by their path (``python benchmarks/throughput.py``): Python puts their own folder on ``sys.path``, not
the repository's, so of the repository's modules they can import only the installed packages'."""


def modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name (a package by its own name: its ``__init__``)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _known(name: str, known: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of ``known`` (``a.b.func`` -> ``a.b``), if any."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _statements(node: ast.AST) -> Iterator[ast.stmt]:
    """Every statement inside ``node``, at any depth (an import is a statement: expressions are not searched)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):
            if isinstance(child, ast.stmt):
                yield child
            yield from _statements(child)


def imports(name: str, known: Mapping[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports, anywhere in its source."""
    path = known[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in _statements(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` in a.b.c is `from a.b import x`
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            found.update(_known(f"{source}.{alias.name}", known) for alias in node.names)
    return {module for module in found if module is not None and module != name}


def import_graph(known: Mapping[str, Path]) -> dict[str, set[str]]:
    """Each module of ``known`` and the modules of ``known`` it imports."""
    return {name: imports(name, known) for name in known}


def _path(graph: Mapping[str, set[str]], start: str, goal: str) -> list[str] | None:
    """The shortest chain of imports from ``start`` to ``goal`` (both included), or None."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for other in sorted(graph[module]):
                if other not in previous:
                    previous[other] = module
                    if other == goal:
                        chain = [goal]
                        while chain[-1] != start or len(chain) == 1:
                            chain.append(previous[chain[-1]])
                        return chain[::-1]
                    following.append(other)
        frontier = following
    return None


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One circle per group of modules that import one another (a strongly connected component), as the chain of
    imports from its first module back to it, e.g. ``["a", "b", "a"]``."""
    found, seen = [], set()
    for module in sorted(graph):
        if module in seen:
            continue
        circle = _path(graph, module, module)
        if circle is None:
            continue
        group = {other for other in graph if _path(graph, module, other) and _path(graph, other, module)}
        seen |= group
        found.append(circle)
    return found


def test_the_repository_has_no_import_circle() -> None:
    found = cycles(import_graph(modules(ROOT)))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in found)


def test_the_programs_run_by_path_import_only_installed_packages() -> None:
    known = modules(ROOT)
    for script in SCRIPTS:
        outside = {name for name in imports(script, known) if name.split(".")[0] not in INSTALLED}
        assert not outside, f"{known[script]} runs as a script, where {sorted(outside)} cannot be imported"


def test_a_circle_is_found_and_named(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    sources = {
        "__init__.py": "from pkg.api import run\n",  # a package importing its own module: no circle
        "api.py": "from .helpers import helper\n\ndef run():\n    return helper()\n",
        "helpers.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.models import Model\n",
        "models.py": "import os\n\ndef make():\n    from pkg import run\n    return run\n",  # the __init__
        "alone.py": "import pkg.alone\n",  # itself: not a circle
    }
    for name, source in sources.items():
        (tmp_path / "pkg" / name).write_text(source)
    graph = import_graph(modules(tmp_path, ["pkg"]))
    assert graph["pkg.helpers"] == {"pkg.models"} and graph["pkg.models"] == {"pkg"}
    assert cycles(graph) == [["pkg", "pkg.api", "pkg.helpers", "pkg.models", "pkg"]]
    (tmp_path / "pkg" / "models.py").write_text("import os\n")
    assert cycles(import_graph(modules(tmp_path, ["pkg"]))) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_read(package: str) -> None:
    assert any(name.startswith(f"{package}.") for name in modules(ROOT, [package])), package
