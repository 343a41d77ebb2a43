"""The layering of README's "Layout": the core (chain, components, recursion, losses,
objective, spec, models) and the certificate import no PyTorch, and every layer type of the core
declares its PyTorch side in its own class."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["chain", "graph", "components", "recursion", "losses", "objective", "spec", "models", "certificate"]


@pytest.mark.parametrize("module", CORE)
def test_core_imports_no_torch(module):
    code = (f"import sys, smoothchain.{module}; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)


def test_every_builtin_component_round_trips_through_torch():
    """Each registered component builds its PyTorch module (to_torch) and reads it back
    (from_torch, through the registry) as itself."""
    pytest.importorskip("torch")
    from smoothchain.components import (
        COMPONENT_TYPES, AdaptiveAvgPool2d, AvgPool2d, BatchNorm, Conv2d, Flatten, Linear, MaxPool2d, Softplus,
        Unflatten,
    )
    from smoothchain.torch_chain import convert

    examples = {
        Linear: (Linear(4, 3, bias=False), (4,)),
        Conv2d: (Conv2d(2, 3, (3, 3), (1, 2), (1, 0), (1, 1), True), (2, 6, 6)),
        Softplus: (Softplus(2.0), (4,)),
        MaxPool2d: (MaxPool2d(2, 2), (1, 4, 4)),
        AvgPool2d: (AvgPool2d(2, 1, 1), (1, 4, 4)),
        AdaptiveAvgPool2d: (AdaptiveAvgPool2d((2, 1)), (1, 4, 4)),
        BatchNorm: (BatchNorm(1e-3, over="entry"), (4,)),
        Flatten: (Flatten(1, -1), (2, 3)),
        Unflatten: (Unflatten(1, (2, 3)), (6,)),
    }
    for cls in COMPONENT_TYPES:
        comp, shape = examples[cls] if cls in examples else (cls(), (4,))
        assert convert(comp.to_torch(), shape) == [comp], cls


def _module_level_imports(path: Path, package: str) -> set[str]:
    """smoothchain modules imported by ``path`` at module level (imports inside functions are
    the deliberate lazy ones that keep the core torch-free)."""
    import ast

    tree = ast.parse(path.read_text())
    here = package.split(".")
    out: set[str] = set()
    for node in tree.body:  # top-level statements only
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            if mod.startswith("smoothchain"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("smoothchain"))
    return out


def test_no_import_cycle_in_the_package():
    pkg = ROOT / "smoothchain"
    modules = {}
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rpartition(".")[0]
        modules[name] = (path, package)
    graph = {name: {m for m in _module_level_imports(path, package) if m in modules and m != name}
             for name, (path, package) in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle through them
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + ".") or node.startswith(nxt + ".") and nxt in modules:
                continue  # parent package <-> its submodule
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_cli_lists_agree_with_the_library():
    """The CLI writes its choices out (it imports no torch before a handler runs): they must be
    the library's."""
    from smoothchain import train
    from smoothchain.cli import train as cli_train

    assert cli_train.CERTIFY_MODES == train.CERTIFY_MODES
    assert cli_train._OPTIMIZERS == train.OPTIMIZERS
