"""Graphs of layers (issue 13, docs/graphs.md): the graph recursion is RH Prop. 4.4 on chains,
the merge rules hold point by point against exact derivatives, and a residual network's
certificate survives estimates at points of C.

References: the chain recursion (itself tested against tests/reference_prop44.py); exact first
and second derivatives of functions of one weight (vectors, so their norms are exact) by
autograd in float64; the estimators of smoothchain.estimators (lower bounds) on a hand-written
PyTorch residual network.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cases import functional_output, point_in_balls
from smoothchain.certificate import build_chain
from smoothchain.chain import ChainError, ComponentConstants
from smoothchain.graph import Concat, Graph, Node, Product, Sum, identity_layer
from smoothchain.recursion import chain_bounds, graph_bounds
from smoothchain.spec import parse_spec
from test_recursion import spec_st

DT = torch.float64


# --------------------------------------------------------------------------- 1. chains
@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(spec_st(weight_norms=True), st.booleans())
def test_graph_recursion_is_prop44_on_chains(spec, around):
    chain = parse_spec(copy.deepcopy(spec)).chain
    graph = Graph.from_chain(chain)
    if around:
        chain, graph = chain.around_weights(), graph.around_weights()
    a, b = chain_bounds(chain), graph_bounds(graph)
    assert b.layers == a.layers  # the same floats: the same layer step in the same order
    assert (b.output_bound, b.lipschitz, b.smoothness) == (a.output_bound, a.lipschitz, a.smoothness)
    assert [n.kind for n in b.nodes] == ["input"] + ["layer"] * len(chain.layers)


# --------------------------------------------------------------------------- 2. merge rules
def _exact(f, w: torch.Tensor):
    """Value, first and second derivative of f: R -> R^k at w (vectors: exact norms)."""
    d1 = torch.func.jacfwd(f)(w)
    d2 = torch.func.jacfwd(torch.func.jacfwd(f))(w)
    return float(f(w).norm()), float(d1.norm()), float(d2.norm())


def _branch(seed: int, k: int):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(k, generator=g, dtype=DT) * 2 for _ in range(3))
    return lambda w: torch.tanh(a * w + b) * c + torch.sin(b * w)


@pytest.mark.parametrize("seed", range(12))
def test_merge_rules_hold_point_by_point(seed):
    """For functions of one weight the value, Jacobian and second derivative are vectors, whose
    norms are exact: each merge's rule, applied to its inputs' values at w, bounds its output's
    at w -- the pointwise inequality behind the rule on sup over C (docs/graphs.md)."""
    g = torch.Generator().manual_seed(100 + seed)
    k = 1 + seed % 4
    f1, f2 = _branch(seed, k), _branch(seed + 50, k)
    c1, c2 = (float(torch.randn((), generator=g, dtype=DT)) for _ in range(2))
    merges = [
        (Sum((c1, c2)), lambda w: c1 * f1(w) + c2 * f2(w)),
        (Sum((c1,)), None),
        (Concat(), lambda w: torch.cat([f1(w), f2(w)])),
        (Product(), lambda w: f1(w) * f2(w)),
    ]
    for _ in range(5):
        w = torch.randn((), generator=g, dtype=DT) * 3
        ins = [_exact(f1, w), _exact(f2, w)]
        for merge, fn in merges:
            if fn is None:  # a scaling: one input
                fn, inputs = (lambda w: c1 * f1(w)), ins[:1]
            else:
                inputs = ins
            got = _exact(fn, w)
            bound = merge.constants(inputs)
            for what, x, y in zip(("m", "l", "L"), got, bound):
                assert x <= y * (1 + 1e-12) + 1e-12, (merge, what, x, y)


def test_sum_rule_is_attained_by_aligned_branches():
    """Equality case: z + z = 2 z, so the sum rule is exact when the branches coincide."""
    f = _branch(3, 3)
    w = torch.tensor(0.4, dtype=DT)
    one = _exact(f, w)
    two = _exact(lambda u: f(u) + f(u), w)
    for x, y in zip(two, Sum((1.0, 1.0)).constants([one, one])):
        assert x == pytest.approx(y, rel=1e-12)


def test_merge_rules_keep_the_zero_times_inf_convention():
    inf = math.inf
    assert Product().constants([(0.0, 0.0, 0.0), (inf, inf, inf)]) == (0.0, 0.0, 0.0)
    assert Sum((0.0, 1.0)).constants([(inf, inf, inf), (1.0, 2.0, 3.0)]) == (1.0, 2.0, 3.0)
    assert Concat().constants([(inf, 1.0, 0.0), (1.0, 1.0, 0.0)]) == (inf, math.sqrt(2.0), 0.0)


def test_bad_graphs_are_named():
    layer = identity_layer([ComponentConstants(1, 1, 1, 0, 1, name="tanh")])
    with pytest.raises(ChainError, match="earlier nodes"):
        Graph((Node("x"), Node("a", (1,), layer=layer)))
    with pytest.raises(ChainError, match="takes one input"):
        Graph((Node("x"), Node("a", (0,), layer=layer), Node("b", (0, 1), layer=layer)))
    with pytest.raises(ChainError, match="exactly one of a layer or a merge"):
        Graph((Node("x"), Node("a", (0,))))
    with pytest.raises(ChainError, match="product takes 2 inputs"):
        Graph((Node("x"), Node("p", (0,), merge=Product())))
    with pytest.raises(ChainError, match="finite coefficients"):
        Sum((math.nan,))


# --------------------------------------------------------------------------- 3. a residual net
class Residual(nn.Module):
    """x -> h = tanh(A x + a) -> y = tanh(h + (B tanh(C h + c) + b)) -> D y + d."""

    def __init__(self, d: int = 5, out: int = 3):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.branch1 = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.branch2 = nn.Linear(d, d)
        self.act = nn.Tanh()
        self.head = nn.Linear(d, out)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.act(h + self.branch2(self.branch1(h))))


def residual_graph(net: Residual, batch: int, d: int, mode: str, radius: float, input_norm: float) -> Graph:
    """The graph of :class:`Residual`, its layers' constants from the chain of each piece."""
    def layers(module):
        return build_chain(module, input_shape=(d,), batch_size=batch, mode=mode).layers

    (inp,), (b1,), (b2,), (head,) = layers(net.inp), layers(net.branch1), layers(net.branch2), layers(net.head)
    # the Tanh after the sum: a layer without weights (the non-linear part of a Linear + Tanh)
    tanh = build_chain(nn.Sequential(nn.Linear(d, d), nn.Tanh()), input_shape=(d,), batch_size=batch,
                       mode=mode).layers[0].nonlinear
    nodes = (Node("x"), Node("inp", (0,), layer=inp), Node("branch1", (1,), layer=b1),
             Node("branch2", (2,), layer=b2), Node("sum", (1, 3), merge=Sum((1.0, 1.0))),
             Node("act", (4,), layer=identity_layer(tanh, "act")), Node("head", (5,), layer=head))
    return Graph(nodes, input_norm=input_norm, radius=radius)


@pytest.mark.parametrize("mode", ["paper", "tight"])
@pytest.mark.parametrize("seed", range(2))
def test_residual_certificate_survives_estimates_on_C(mode, seed):
    from smoothchain.estimators import jacobian_norm, output_norm, second_derivative_norm

    d, batch, radius, input_norm = 5, 3, 0.8, 1.5
    torch.manual_seed(seed)
    net = Residual(d).double()
    bounds = graph_bounds(residual_graph(net, batch, d, mode, radius, input_norm))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=g, dtype=DT)
    x = x * (input_norm / x.norm())
    psi = functional_output(net, x)

    for i in range(3):
        w = point_in_balls(net, radius, g, boundary=i % 2 == 0)
        assert output_norm(psi, w).value <= bounds.output_bound * (1 + 1e-9)
        assert jacobian_norm(psi, w, iters=40, seed=i).value <= bounds.lipschitz * (1 + 1e-9)
        assert second_derivative_norm(psi, w, iters=20, seed=i).value <= bounds.smoothness * (1 + 1e-9)
    assert [n.kind for n in bounds.nodes] == ["input", "layer", "layer", "layer", "sum", "layer", "layer"]
    assert math.isfinite(bounds.smoothness)
