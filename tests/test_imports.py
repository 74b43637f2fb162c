"""The package's import graph: no circle, not even through an import inside a function, and every module
imports first (before any other phi3_lora module) without help."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "phi3_lora"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the phi3_lora modules it imports anywhere in its text (top level and inside functions).

    Edges into the package root are left out: `phi3_lora/__init__.py` defines __version__ and imports nothing
    at load time, and any `import phi3_lora.x` has run it already, so an edge to it never closes a circle."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level` steps up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:  # `from pkg import module` names a module; `from mod import name` does not
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t not in (name, "phi3_lora")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_import_graph_has_no_circle():
    graph = import_graph()
    assert "phi3_lora.train" in graph["phi3_lora.steptime_child"]  # the walk sees function bodies' imports too
    assert not [" -> ".join(c) for c in cycles(graph)]


def test_the_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# One fresh interpreter; before each module every phi3_lora module is dropped, so each is imported first
# (torch, transformers and gradio stay loaded: importing them again would only cost minutes).
_IMPORT_EACH = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "phi3_lora" or m.startswith("phi3_lora.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""


@pytest.mark.slow
def test_every_module_imports_first_on_its_own():
    names = sorted(n for n in import_graph() if not n.endswith("__main__"))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


def test_no_ui_or_generate_module_imports_train():
    """Training is a process the UI starts through jobs; answering never needs the trainer."""
    graph = import_graph()
    users = [n for n in graph if n.startswith("phi3_lora.ui") or n == "phi3_lora.generate"]
    assert "phi3_lora.ui.app" in users
    assert not [n for n in users if "phi3_lora.train" in graph[n] or "phi3_lora.trainer" in graph[n]]


def test_only_the_speed_path_touches_private_library_apis():
    """The speed path's private-API users live in phi3_lora/speed/, behind its version guards."""
    private = ("torch._C", "torch._dynamo", "_set_allocator_settings", "_convert_weight_packed_for_cpu_inverse",
               "GradientCheckpointingLayer", "AttentionInterface")
    outside = [f"{p.relative_to(PACKAGE)}: {s}" for p in PACKAGE.rglob("*.py") if "speed" not in p.parts
               for s in private if s in p.read_text(encoding="utf-8")]
    assert not outside
