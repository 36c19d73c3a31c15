"""The layering of ../shared/DESIGN.md ("Layout", the "may import" column), checked on every import.

Every module of Kelvin is parsed (ast, nothing is imported); each import, at module level or inside
a function, must be one its layer may make, and the module-level graph of Kelvin's own modules must
have no cycle (lazy imports count: a cycle broken by a lazy import is still a cycle).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("samplers", "anomaly", "policies", "envs", "kelvin")

# layer -> first-party layers it may import (DESIGN.md's "may import" column; its own layer included)
MAY_IMPORT: dict[str, set[str]] = {
    "samplers.core": {"samplers.core"},
    "anomaly": {"anomaly", "samplers.core"},
    "policies": {"policies", "samplers.core", "anomaly"},
    "envs": {"envs", "samplers.core", "samplers", "policies", "anomaly"},
    "samplers": {"samplers", "samplers.core", "policies", "anomaly"},  # runtime, hf, llama_cpp, vllm
    "kelvin": {"kelvin", "envs", "samplers", "samplers.core", "policies", "anomaly"},
    "cli": {"kelvin"},  # train.py, evaluate.py: thin entry points
}
# the bottom layers name their third-party imports too (stdlib is always fine)
THIRD_PARTY: dict[str, set[str]] = {"samplers.core": {"torch"}, "anomaly": {"torch", "numpy"}}
# training-only libraries the deployment side (loaders, samplers) must never need
TRAINING_ONLY = {"stable_baselines3", "gymnasium"}
DEPLOYMENT = {"samplers.core", "anomaly", "policies", "samplers"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    """The DESIGN.md row a module belongs to (``samplers/__init__`` runs whenever ``samplers.core`` is imported)."""
    if module in ("train", "evaluate"):
        return "cli"
    if module in ("samplers", "samplers.core", "samplers.suggest"):  # suggest: core's stdlib helper, for every layer
        return "samplers.core"
    return module.split(".")[0]


def _modules() -> dict[str, Path]:
    files = [ROOT / "train.py", ROOT / "evaluate.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return {_module_name(f): f for f in files}


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return out


def _first_party(name: str) -> str | None:
    """The Kelvin module ``name`` refers to (itself or its closest parent), or None for anything else."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_tree_is_what_the_layout_lists():
    layers = {_layer(m) for m in MODULES}
    assert layers == set(MAY_IMPORT)
    assert {"samplers.core", "anomaly.prior", "kelvin.rundir", "kelvin.export", "kelvin.evaluation.cli",
            "policies.base", "policies.artifact"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    layer = _layer(module)
    bad = []
    for name, line in _imports(MODULES[module]):
        target = _first_party(name)
        top = name.split(".")[0]
        if target is not None:
            if _layer(target) not in MAY_IMPORT[layer]:
                bad.append(f"line {line}: {name} (layer {_layer(target)})")
        elif top not in sys.stdlib_module_names and top != "__future__":
            if layer in THIRD_PARTY and top not in THIRD_PARTY[layer]:
                bad.append(f"line {line}: {name} (third-party; {layer} may import {sorted(THIRD_PARTY[layer])})")
            if layer in DEPLOYMENT and top in TRAINING_ONLY:
                bad.append(f"line {line}: {name} (training-only library in the deployment layer {layer})")
    assert not bad, f"{module} (layer {layer}) may import {sorted(MAY_IMPORT[layer])}; it imports " + "; ".join(bad)


def _graph() -> dict[str, set[str]]:
    """Module -> Kelvin modules it imports (edges to its own ancestor packages left out: ``from policies.x import``
    runs ``policies/__init__`` first, which is how packages work, not a cycle)."""
    graph = {}
    for module, path in MODULES.items():
        targets = {_first_party(name) for name, _ in _imports(path)} - {None, module}
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checks themselves: an upward import and a two-module cycle are found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("samplers") == _layer("samplers.core") == "samplers.core" and _layer("samplers.hf") == "samplers"
    assert _layer("kelvin.evaluation.run") == "kelvin" and _layer("train") == "cli"
    assert "kelvin" not in MAY_IMPORT["policies"] and "policies" not in MAY_IMPORT["anomaly"]
