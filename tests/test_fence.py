"""The private-API fence: no file of the repo but ``lightning_fedhog/internals.py`` touches a private name of another
library (Lightning, torch, torchvision, ...), except the override points that module lists (each with its canary in
``tests/test_internals.py``).

A private name is "foreign" when the repo does not define it itself: ``from lightning... import _name``, an import of
a private module (``torch._utils``), ``something._name`` or ``getattr(something, "_name")`` where no module, class or
``self._name = ...`` of the repo defines ``_name``. Inside a class whose bases come from another library, ``self._name``
(read, written or defined as a method) is foreign when such a base defines or sets it. What the scan cannot see, review
by eye: a name that both the repo and a library define, read on an object that is not ``self``
(``module._trainer``), and classes defined inside functions (they cannot be imported to find their bases).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import re
from functools import cache
from pathlib import Path

import pytest

from lightning_fedhog import internals

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("lightning_fedhog", "benchmarks", "recipes", "tests")
OURS = SCANNED  # top-level packages whose names are the repo's own
EXEMPT = {Path("lightning_fedhog/internals.py"), Path("tests/test_internals.py"), Path("tests/test_fence.py")}
PUBLIC_UNDERSCORE = {"_exit", "_replace", "_asdict", "_fields", "_make"}  # documented stdlib names (os, namedtuple)


def _files() -> list[Path]:
    return sorted(p for package in SCANNED for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@cache
def _own_names() -> frozenset[str]:
    """Private names the repo defines: functions, classes, assignments, ``self._x = ...``, parameters."""
    names: set[str] = set()
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                receiver = node.value
                if isinstance(receiver, ast.Name) and receiver.id in {"self", "cls"}:
                    names.add(node.attr)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
    return frozenset(name for name in names if _private(name))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _load(path: Path) -> object:
    if path.is_relative_to(ROOT):
        return importlib.import_module(_module_name(path))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _foreign_bases(path: Path, class_name: str) -> list[type]:
    """The other libraries' classes in the MRO of ``class_name`` (imported: AST alone cannot resolve bases)."""
    try:
        cls = getattr(_load(path), class_name)
    except Exception:  # a class defined inside a function, or a module that needs a GPU: nothing to resolve
        return []
    return [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] not in {*OURS, "builtins", "typing"}]


@cache
def _defined_by(base: type) -> frozenset[str]:
    names = {name for name in vars(base) if _private(name)}
    with contextlib.suppress(OSError, TypeError):  # a class without source (a C extension)
        names |= set(re.findall(r"self\.(_[a-zA-Z]\w*)", inspect.getsource(base)))
    return frozenset(name for name in names if _private(name))


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    own, found = _own_names(), []
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] not in OURS:
            imported = [alias.name for alias in node.names if _private(alias.name)]
            if any(_private(part) for part in node.module.split(".")):
                imported.append("* (a private module)")
            found += [f"{where}:{node.lineno}: from {node.module} import {name}" for name in imported]
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] not in OURS and any(_private(p) for p in alias.name.split("."))]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in {"getattr", "setattr", "hasattr", "delattr"} and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value) and node.args[1].value not in own):
            found.append(f"{where}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in PUBLIC_UNDERSCORE:
            receiver = node.value
            on_self = isinstance(receiver, ast.Name) and receiver.id in {"self", "cls"}
            if not on_self and node.attr not in own:
                found.append(f"{where}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ClassDef) and node.bases:
            bases = _foreign_bases(path, node.name)
            inherited = frozenset().union(*(_defined_by(base) for base in bases)) if bases else frozenset()
            for inner in ast.walk(node):
                name, line = None, getattr(inner, "lineno", node.lineno)
                if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id == "self":
                    name = inner.attr
                elif isinstance(inner, ast.FunctionDef) and inner in node.body:
                    name = inner.name
                if name and name in inherited and name not in internals.OVERRIDE_POINTS:
                    found.append(f"{where}:{line}: {node.name}.{name} (defined by {bases[0].__name__}'s family)")
    return found


@pytest.mark.parametrize("path", [p for p in _files() if p.relative_to(ROOT) not in EXEMPT], ids=str)
def test_no_private_library_name_outside_internals(path: Path) -> None:
    found = sorted(set(_violations(path)))
    assert not found, (
        "private Lightning/torch names outside lightning_fedhog/internals.py: wrap each in a function there (with a"
        " canary in tests/test_internals.py) or list it in internals.OVERRIDE_POINTS:\n" + "\n".join(found)
    )


def test_the_scan_finds_what_it_must(tmp_path: Path) -> None:
    """The fence can fail: private imports, foreign attributes and inherited private names are all caught."""
    probe = tmp_path / "fence_probe.py"
    probe.write_text(
        "import torch._utils\n"
        "from lightning.pytorch.utilities.data import _update_dataloader\n"
        "from lightning.pytorch.strategies.ddp import DDPStrategy\n"
        "from torch._utils import classproperty\n\n"
        "def peek(trainer):\n    return trainer._signal_connector, getattr(trainer, '_checkpoint_connector')\n\n"
        "class Probe(DDPStrategy):\n    def _get_process_group_backend(self):\n        return self._ddp_kwargs\n"
    )
    found = "\n".join(_violations(probe))
    for expected in ("import torch._utils", "import _update_dataloader", "from torch._utils import *",
                     "._signal_connector", "'_checkpoint_connector'", "Probe._get_process_group_backend",
                     "Probe._ddp_kwargs"):
        assert expected in found, found
