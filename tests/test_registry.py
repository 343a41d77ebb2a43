"""Layer types declared as one class (smoothchain.components.Elementwise): every activation's
scalar facts against brute force in float64, and the toy activation of docs/registry.md end to end."""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import smoothchain  # noqa: E402
from smoothchain.components import COMPONENT_TYPES, Elementwise, ScalarFacts, Softplus  # noqa: E402
from smoothchain.torch_chain import REGISTRY  # noqa: E402

GRID = torch.linspace(-30.0, 30.0, 600_001, dtype=torch.float64)


def assert_facts_hold(component: Elementwise) -> None:
    """Sound: the grid's sup |a|, |a'|, |a''| (autograd derivatives of the component's PyTorch
    module, not of its ``function``) and |a(0)|, |a'(0)| never exceed the declared facts, in both
    modes.  Tight: the finite tight sups of |a'| and |a''| are approached to 1e-3 on the grid (sup |a|
may be reached only at infinity, e.g. softsign's).  The functional
    forward equals the module's."""
    t = GRID.clone().requires_grad_()
    module = component.to_torch().double()
    y = module(t)
    d1 = torch.autograd.grad(y.sum(), t, create_graph=True)[0]
    d2 = torch.autograd.grad(d1.sum(), t)[0]
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    y0 = module(zero)
    (g0,) = torch.autograd.grad(y0.sum(), zero)
    seen = (y.abs().max().item(), d1.abs().max().item(), d2.abs().max().item(), abs(y0.item()), abs(g0.item()))
    for mode in ("tight", "paper"):
        declared = dataclasses.astuple(component.scalar_facts(mode))
        for name, d, s_ in zip(("bound", "d1", "d2", "at_zero", "d1_at_zero"), declared, seen):
            assert s_ <= d * (1 + 1e-12) + 1e-15, (component, mode, name, d, s_)
    for d, s_ in zip(dataclasses.astuple(component.scalar_facts("tight"))[1:3], seen[1:3]):
        if math.isfinite(d):
            assert s_ >= d * (1 - 1e-3), (component, d, s_)
    torch.testing.assert_close(component.function(GRID[::1000]), module(GRID[::1000]))


@pytest.mark.parametrize("component", [c() for c in COMPONENT_TYPES if issubclass(c, Elementwise)]
                         + [Softplus(3.0)], ids=repr)
def test_builtin_activation_facts(component):
    assert_facts_hold(component)


# ------------------------------------------------------------------ the toy of docs/registry.md
@dataclasses.dataclass(frozen=True)
class Softsign(Elementwise):
    """x / (1 + |x|): |a| < 1, a' = 1/(1+|x|)^2 <= 1, |a''| = 2/(1+|x|)^3 <= 2, a(0) = 0, a'(0) = 1."""

    facts = ScalarFacts(bound=1.0, d1=1.0, d2=2.0, at_zero=0.0, d1_at_zero=1.0)
    torch_types = ("Softsign",)

    def function(self, x):
        return x / (1 + x.abs())


def test_toy_activation_softsign():
    smoothchain.register_component(Softsign)
    try:
        assert_facts_hold(Softsign())
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Softsign(), nn.Linear(8, 3), nn.Softsign()).double()
        cert = smoothchain.certify(net, input_shape=(4,), batch_size=3, mode="tight")
        assert [c.name for c in cert.chain.layers[0].nonlinear] == ["softsign"]
        assert math.isfinite(cert.objective.smoothness)
        # the estimates of check never exceed it ...
        from smoothchain.check import check

        res = check(net, input_shape=(4,), batch_size=3, mode="tight", points=2, ascent_steps=2)
        assert not res.violations
        # ... and DSGD reads F's activation constants from the same class
        from smoothchain.dsgd import parse_model

        assert [s.activation.d2 for s in parse_model(net)] == [2.0, 2.0]
    finally:
        REGISTRY.pop(nn.Softsign, None)
