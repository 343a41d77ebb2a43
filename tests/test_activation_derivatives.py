"""The activations' derivative facts (smoothchain.components.Elementwise) against autograd on
the PyTorch modules they stand for: the closed-form derivatives up to order 3, the declared
sup |a'''| and the sups over intervals that segment certificates use (docs/segment.md)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smoothchain.components import Sigmoid, Softplus, Tanh  # noqa: E402

DT = torch.float64
SMOOTH = [Tanh(), Sigmoid(), Softplus(0.5), Softplus(1.0), Softplus(3.0)]


def _autograd(comp, t: torch.Tensor, orders: int = 3) -> list[torch.Tensor]:
    """Derivatives of the PyTorch module itself (not the component's ``function``)."""
    t = t.detach().clone().requires_grad_(True)
    g = comp.to_torch().double()(t)
    out = []
    for k in range(orders):
        g = torch.autograd.grad(g.sum(), t, create_graph=k < orders - 1)[0]
        out.append(g.detach())
    return out


@pytest.mark.parametrize("comp", SMOOTH, ids=lambda c: f"{type(c).__name__}{getattr(c, 'beta', '')}")
def test_closed_form_derivatives_match_autograd(comp):
    t = torch.linspace(-12, 12, 4001, dtype=DT)
    for got, want in zip(comp.derivatives(t, 3), _autograd(comp, t)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert [d.shape for d in comp.derivatives(t, 2)] == [t.shape, t.shape]


@pytest.mark.parametrize("comp", SMOOTH, ids=lambda c: f"{type(c).__name__}{getattr(c, 'beta', '')}")
def test_declared_third_derivative_sup_is_attained(comp):
    t = torch.linspace(-15, 15, 300001, dtype=DT)
    grid = float(_autograd(comp, t)[2].abs().max())
    assert grid <= comp.d3 * (1 + 1e-9) and comp.d3 <= grid * (1 + 1e-6)
    for c in comp.d3_peaks:  # each declared peak is a critical point of a'''
        h = 1e-4
        left, mid, right = (float(v) for v in comp.derivatives(torch.tensor([c - h, c, c + h], dtype=DT), 3)[2].abs())
        assert mid >= max(left, right) - 1e-12


@settings(max_examples=40, deadline=None)
@given(comp=st.sampled_from(SMOOTH), centres=st.lists(st.floats(-6, 6), min_size=1, max_size=4),
       width=st.floats(0.0, 3.0))
def test_sups_on_intervals_bound_and_attain_the_grid(comp, centres, width):
    lo = torch.tensor(centres, dtype=DT) - width
    hi = torch.tensor(centres, dtype=DT) + width
    sups = comp.sups_on(lo, hi)
    t = torch.stack([torch.linspace(a, b, 20001, dtype=DT) for a, b in zip(lo.tolist(), hi.tolist())]).reshape(-1)
    grids = [float(d.abs().max()) for d in _autograd(comp, t)]
    for s, g, glob in zip(sups, grids, (comp.facts.d1, comp.facts.d2, comp.d3)):
        assert g <= s * (1 + 1e-9) + 1e-15
        assert s <= g * (1 + 1e-4) + 1e-9  # exact up to the grid's spacing
        assert s <= glob
