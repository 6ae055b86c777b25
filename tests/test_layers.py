"""The package's layers only look down: no import cycle, and no lower layer imports an upper one.

Every `import` and `from ... import` in src/kvcompress is read with `ast`, function-level ones
included. Only the package root (`kvcompress/__init__.py`, which re-exports the public API) is
left out of the cycle check; every subpackage's `__init__` is a node like any module.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "kvcompress"

# Bottom to top. A module may import modules of its own layer or of lower layers only.
LAYERS = [
    {"_version", "io", "extras", "compat", "executor"},
    # kernels: codecs.quant calls the Triton pack kernel, and kernels.cpu reads QuantCodec: one layer;
    # paged (the slot layout of a paged pool) is read by kernels.paged_attention
    {"models", "corpus", "fingerprint", "rope", "codecs", "spec", "kernels", "paged"},
    {"presets", "calibration"},
    {"cache", "integrations"},  # integrations: engine plugins over spec, codecs, presets and paged
    {"measure"},
    {"experiments", "tuning", "bench", "generate", "distributed"},  # distributed: Ray actors load models
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the kvcompress modules `path` imports, at any depth of the code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kvcompress"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("kvcompress"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import x` may name a submodule
                candidate = f"{target}.{alias.name}"
                if (SRC / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (SRC / Path(*candidate.split("."))).is_dir():
                    found.add(candidate)
    return found - {name}


@functools.cache
def all_modules() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def top_part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and nxt in graph:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    graph = {m: targets - {"kvcompress"} for m, targets in all_modules().items() if m != "kvcompress"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer():
    unplaced = sorted({top_part(m) for m in all_modules()} - set(RANK) - {""})
    assert not unplaced, f"modules outside any layer: {unplaced}; add them to LAYERS in this test"


@pytest.mark.parametrize("module", sorted(all_modules()))
def test_imports_only_look_down(module):
    modules = all_modules()
    if top_part(module) == "":
        return  # the package root re-exports the public API
    mine = RANK[top_part(module)]
    upward = sorted(t for t in modules[module] if top_part(t) and RANK.get(top_part(t), -1) > mine)
    assert not upward, f"{module} (layer {mine}) imports upper-layer modules {upward}"
