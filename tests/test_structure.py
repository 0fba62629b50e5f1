"""The structure of the code: no import cycles, every module importable on its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("components", "pipelines")
MODULES = sorted(f"{p.parent.name}.{p.stem}" for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
                 if p.stem != "__init__")


def imports_of(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its body (function-local imports too)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES}
    return found - {module}


def test_no_import_cycles():
    """No module imports (directly or through others) a module that imports it back — also not
    through a function-local import, which would only hide the cycle. (Strongly connected
    components of the import graph, Tarjan's algorithm: each must be a single module.)"""
    graph = {m: imports_of(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in MODULES:
        if m not in index:
            strongconnect(m)
    assert not cycles, "modules that import each other: " + "; ".join(" ↔ ".join(c) for c in cycles)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_alone(module):
    res = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# What a pipeline task imports: KFP's executor runs it with kfp.dsl in its reduced runtime mode
# (`_KFP_RUNTIME=true`), where kfp.kubernetes and most of kfp.dsl cannot be imported.
TASK_RUNTIME = ["pipelines.runtime", "pipelines.parent_run", "pipelines.warm_start", "pipelines.trainer_job", "pipelines.kfp_components"] + [
    m for m in MODULES if m.startswith("components.")]


def test_what_tasks_import_works_in_kfps_runtime_mode():
    code = "import kfp.dsl.executor_main\n" + "".join(f"import {m}\n" for m in TASK_RUNTIME)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "_KFP_RUNTIME": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
