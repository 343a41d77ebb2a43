"""The layering of README's "Layout": the core (chain, components, recursion, losses,
objective, spec, models) and the certificate import no PyTorch, and every layer type of the core
declares its PyTorch side in its own class."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["chain", "components", "recursion", "losses", "objective", "spec", "models", "certificate"]


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
