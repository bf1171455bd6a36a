"""Module boundaries: each module imports on its own, no import cycles, public names only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import skpatchcore

PACKAGE = Path(skpatchcore.__file__).resolve().parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(module):
    """skpatchcore modules that ``module`` imports anywhere in its body (lazy ones too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skpatchcore"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "skpatchcore":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found - {module}


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_on_its_own(module):
    result = subprocess.run([sys.executable, "-c", f"import skpatchcore.{module}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_module_imports_one_that_imports_it_back():
    graph = {m: _imports(m) for m in MODULES}
    assert all("__init__" not in deps for deps in graph.values()), graph

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    cycles = [m for m in MODULES if m in reachable(m)]
    assert not cycles, {m: graph[m] for m in cycles}


def test_no_private_name_is_used_across_modules():
    """``from .x import _name`` and ``module._name`` between package modules are not allowed:
    a helper used by two modules is public in one of them."""
    offenders = []
    for module in MODULES + ["__init__"]:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                offenders += [f"{module}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def test_init_exports_public_names_only():
    assert all(not name.startswith("_") or name == "__version__"
               for name in skpatchcore.__all__)
    for name in skpatchcore.__all__:
        assert hasattr(skpatchcore, name)
    # every public class is documented and lives in (or is re-exported from) a module
    for name in skpatchcore.__all__:
        obj = getattr(skpatchcore, name)
        assert isinstance(obj, str) or obj.__doc__, name
