"""No module of the project uses another module's private (underscore) names.

A name that starts with one underscore is its module's own business: when another module needs it, it gets a public
name that says what it is, and the module that defines it keeps it working as part of its contract. This walks every
``.py`` under ``peft_post/`` and ``benchmarks/`` with `ast` and fails on

- ``from <module> import _name`` (relative or absolute), and
- ``<alias>._name`` where ``<alias>`` was bound to a module by ``import <module> [as alias]`` or
  ``from <package> import <module> [as alias]``,

where ``<module>`` is another module of this project (a ``peft_post`` module, or a benchmark). Dunder names
(``__version__``) are fine; third-party private names (e.g. Opacus's) are out of scope here. Two more rules keep the
scripts independent: no benchmark imports another, and no test module imports another test module (shared builders
live in `peft_post.testing` or in ``tests/conftest.py`` fixtures).
"""

from __future__ import annotations

import ast
import os
from typing import Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "peft_post"
BENCHMARKS = "benchmarks"


def _python_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(os.path.join(ROOT, folder)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return found


def _module_name(path: str) -> str:
    """``peft_post/pipeline/store.py`` -> ``peft_post.pipeline.store``; a package's ``__init__.py`` -> the package."""
    relative = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    if relative[-1] == "__init__":
        relative = relative[:-1]
    return ".".join(relative)


FILES = {path: _module_name(path) for folder in (PACKAGE, BENCHMARKS) for path in _python_files(folder)}
PROJECT_MODULES = frozenset(FILES.values())
PACKAGES = frozenset(_module_name(p) for p in FILES if p.endswith("__init__.py"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(module: Optional[str], level: int, current: str, is_package: bool) -> str:
    """The absolute name of ``from <.. level><module> import ...`` written in module `current`."""
    if level == 0:
        return module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]  # a plain module's relative imports start from its package
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _dotted(node: ast.AST) -> Optional[list[str]]:
    """``a.b.c`` -> ['a', 'b', 'c'] for a chain of names; None for anything else (a call, a subscript)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses(path: str) -> list[str]:
    """Every use, in the file at `path`, of another project module's private name, as 'file:line: what'."""
    current = FILES[path]
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    where = os.path.relpath(path, ROOT)
    found = []
    aliases: dict[str, str] = {}  # local name -> the project module (or top package) it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(node.module, node.level, current, is_package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}" if source else alias.name
                if submodule in PROJECT_MODULES:  # `from peft_post import pipeline as P`
                    aliases[alias.asname or alias.name] = submodule
                if source in PROJECT_MODULES and source != current and _is_private(alias.name):
                    found.append(f"{where}:{node.lineno}: from {source} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    if alias.name in PROJECT_MODULES:
                        aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    if top in PROJECT_MODULES:
                        aliases[top] = top
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
            continue
        chain = _dotted(node.value)
        if chain is None or chain[0] not in aliases:
            continue
        module = ".".join([aliases[chain[0]], *chain[1:]])
        if module in PROJECT_MODULES and module != current:
            found.append(f"{where}:{node.lineno}: {module}.{node.attr}")
    return found


def test_the_walk_sees_the_project():
    assert "peft_post.pipeline" in PACKAGES and "peft_post.pipeline.stages" in PROJECT_MODULES
    assert "benchmarks.students" in PROJECT_MODULES and "benchmarks" in PACKAGES


def _imported_modules(path: str) -> set[str]:
    """The top-level names and dotted modules that the file at `path` imports (absolute imports only)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


BENCHMARK_MODULES = sorted(m for m in PROJECT_MODULES if m.startswith(BENCHMARKS + "."))
TEST_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py"))


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_no_benchmark_imports_another(module):
    path = next(p for p, m in FILES.items() if m == module)
    others = {m for m in BENCHMARK_MODULES if m != module} | {m.split(".")[-1] for m in BENCHMARK_MODULES if m != module}
    assert _imported_modules(path) & others == set()


@pytest.mark.parametrize("name", TEST_FILES)
def test_no_test_module_imports_another(name):
    others = {f[:-len(".py")] for f in TEST_FILES if f != name}
    imported = {m.split(".")[-1] if m.startswith("tests.") else m for m in _imported_modules(
        os.path.join(ROOT, "tests", name))}
    assert imported & others == set()


@pytest.mark.parametrize("path", sorted(FILES), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_module_uses_another_modules_private_names(path):
    assert private_uses(path) == []


def test_the_check_catches_each_form(tmp_path, monkeypatch):
    sample = os.path.join(ROOT, PACKAGE, "pipeline", "stages.py")
    source = "\n".join([
        "from ..modeling import _head",  # relative, one package up
        "from .store import _texts",  # relative, a sibling
        "from peft_post.pipeline import _load_lm",  # absolute, a package
        "import peft_post.pipeline.store as S",
        "from peft_post import assets as A",
        "import peft_post.io",
        "S._texts; A._parse; peft_post.io._tmp",
        "from opacus.optimizers.optimizer import _generate_noise",  # third party: out of scope
        "from . import __version__",  # dunder: fine
        "from .loading import load_model",  # public: fine
        "def f(x): return x._private",  # not a module
    ])
    path = tmp_path / "stages.py"
    path.write_text(source)
    monkeypatch.setitem(FILES, str(path), FILES[sample])
    uses = [u.split(": ", 1)[1] for u in private_uses(str(path))]
    assert uses == ["from peft_post.modeling import _head", "from peft_post.pipeline.store import _texts",
                    "from peft_post.pipeline import _load_lm", "peft_post.pipeline.store._texts",
                    "peft_post.assets._parse", "peft_post.io._tmp"]
