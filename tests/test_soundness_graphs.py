"""Soundness suite on random computation graphs (issue 13): nothing measured on C may exceed the
certificate of a network with skip connections.

Hypothesis draws random DAGs as PyTorch modules read by torch.fx (smoothchain.torch_graph):
``Linear`` layers with an optional activation (ReLU, softplus, sigmoid, tanh) fed by any earlier
node, residual sums ``a + b`` / differences / scalings of nodes of equal width (skip
connections of random span), concatenations ``torch.cat``, entry-wise products, activations
after a merge, and a linear head; with a batch size, an input norm X, a radius R and C centred
at 0 (RH Prop. 4.4) or at the weights (RH Cor. 4.5).  Each case is certified in BOTH constant
modes and measured on C as tests/test_soundness.py measures chains: at a point on the boundary
of every ball and one inside, ||psi(w)||, ||grad psi(w)||_op (SVD of the dense Jacobian, exact)
and a lower bound of ||grad^2 psi(w)||_{2,2,2} for the whole network, ||z_n|| and ||grad z_n||
for every node (layers and merges) whose value an operation computes (at the first point), and the
objective's top |Hessian eigenvalue| (dense, exact).  Every value is attained at a point of C,
so ``measured <= certified * (1 + RTOL)`` must hold; infinite bounds (ReLU) are skipped for that
quantity.  ``N_CASES`` >= 300 in the default profile, ten times more with
``SMOOTHCHAIN_PROFILE=long``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import given
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits
from torch import nn
from torch.func import jacrev

from smoothchain import certify
from smoothchain.check import _prefixes, _random_point
from smoothchain.estimators import flat_parameters, objective
from test_soundness import DT, MODES, chain_measures, examples, objective_measure, violations_of

N_CASES = 300
ACTS = {"none": None, "relu": nn.ReLU, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class RandomDAG(nn.Module):
    """Nodes computed in order from ``ops``; the output is the last node's value."""

    def __init__(self, d_in: int, ops: list):
        super().__init__()
        self.ops = [tuple(op) for op in ops]
        self.lins = nn.ModuleList()
        self.acts = nn.ModuleList()
        widths = [d_in]
        for op in self.ops:
            kind = op[0]
            if kind == "layer":
                _, src, width, act = op
                self.lins.append(nn.Linear(widths[src], width))
                self.acts.append(ACTS[act]() if ACTS[act] else nn.Identity())
                widths.append(width)
            elif kind == "act":
                self.acts.append(ACTS[op[2]]())
                widths.append(widths[op[1]])
            elif kind == "cat":
                widths.append(widths[op[1]] + widths[op[2]])
            else:  # sum, diff, scale, mul
                widths.append(widths[op[1]])

    def forward(self, x):
        vals, li, ai = [x], 0, 0
        for op in self.ops:
            kind = op[0]
            if kind == "layer":
                vals.append(self.acts[ai](self.lins[li](vals[op[1]])))
                li, ai = li + 1, ai + 1
            elif kind == "act":
                vals.append(self.acts[ai](vals[op[1]]))
                ai += 1
            elif kind == "sum":
                vals.append(vals[op[1]] + vals[op[2]])
            elif kind == "diff":
                vals.append(vals[op[1]] - vals[op[2]])
            elif kind == "scale":
                vals.append(op[2] * vals[op[1]])
            elif kind == "mul":
                vals.append(vals[op[1]] * vals[op[2]])
            else:
                vals.append(torch.cat([vals[op[1]], vals[op[2]]], dim=1))
        return vals[-1]


@dataclass
class Case:
    d_in: int = 3
    ops: list = field(default_factory=list)
    batch: int = 2
    input_norm: float = 1.0
    radius: float = 0.5
    around: bool = False
    seed: int = 0

    def build(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = RandomDAG(self.d_in, self.ops).to(DT)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 1.0 / math.sqrt(max(1, p.numel())))
        return model


@st.composite
def dag_cases(draw) -> Case:
    d_in = draw(st.integers(2, 4))
    widths, ops = [d_in], []
    for _ in range(draw(st.integers(2, 6))):
        n = len(widths)
        kind = draw(st.sampled_from(["layer", "layer", "skip", "skip", "cat", "mul", "act"]))
        same = [(a, b) for a in range(n) for b in range(a + 1, n) if widths[a] == widths[b]]
        if kind == "skip" and same:
            a, b = draw(st.sampled_from(same))  # a skip connection of span b - a
            merge = draw(st.sampled_from(["sum", "sum", "diff", "scale"]))
            ops.append(("scale", b, draw(st.sampled_from([0.5, -1.5, 2.0]))) if merge == "scale" else (merge, a, b))
            widths.append(widths[b])
        elif kind == "cat" and n >= 2 and sum(widths) < 16:
            a, b = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            ops.append(("cat", a, b))
            widths.append(widths[a] + widths[b])
        elif kind == "mul" and same:
            a, b = draw(st.sampled_from(same))
            ops.append(("mul", a, b))
            widths.append(widths[a])
        elif kind == "act":
            src = draw(st.integers(0, n - 1))
            ops.append(("act", src, draw(st.sampled_from(["softplus", "sigmoid", "tanh", "relu"]))))
            widths.append(widths[src])
        else:
            src = draw(st.integers(max(0, n - 3), n - 1))
            width = draw(st.sampled_from([widths[src], 2, 3, 4]))
            ops.append(("layer", src, width, draw(st.sampled_from(list(ACTS)))))
            widths.append(width)
    ops.append(("layer", len(widths) - 1, draw(st.integers(1, 3)), "none"))  # the head
    return Case(d_in, ops, batch=draw(st.integers(1, 3)), input_norm=draw(st.sampled_from([0.5, 1.0, 2.0])),
                radius=draw(st.sampled_from([0.1, 0.5, 1.0])), around=draw(st.booleans()),
                seed=draw(st.integers(0, 10**6)))


def run_case(case: Case) -> list[str]:
    model = case.build()
    shape = (case.d_in,)
    certs = {mode: certify(model, input_shape=shape, batch_size=case.batch, radius=case.radius,
                           input_norm=case.input_norm, loss="square", mode=mode, around_weights=case.around)
             for mode in MODES}
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn((case.batch,) + shape, generator=gen, dtype=DT)
    x = x * (case.input_norm / float(x.norm()))
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=gen, dtype=DT)
    y = y / y.norm(dim=1, keepdim=True)
    blocks, psis = _prefixes(model, shape, x, graph=True)
    w_star = flat_parameters(model)
    centre = w_star if case.around else torch.zeros_like(w_star)
    points = [_random_point(centre, blocks, case.radius, gen, boundary=b) for b in (True, False)]
    last = len(psis) - 1
    measured: list[tuple[int, str, float]] = []
    for li, psi in enumerate(psis):
        if psi is None or li == last:
            continue
        J = jacrev(psi)(points[0])
        measured.append((li, "output_bound", float(psi(points[0]).norm())))
        measured.append((li, "lipschitz", float(torch.linalg.matrix_norm(J, 2)) if J.numel() else 0.0))
    for w in points:
        meas = chain_measures(psis[last], w)
        measured += [(last, k, meas[k]) for k in ("output_bound", "lipschitz", "smoothness")]
    F = objective(model, x, y, loss="square")
    measured += [(-1, "objective", objective_measure(F, w)) for w in points]
    return violations_of(certs, measured, rows=lambda cert: cert.bounds.nodes[1:])


@examples(N_CASES)
@given(dag_cases())
def test_random_graphs_sound(case):
    with threadpool_limits(1):
        violations = run_case(case)
    assert not violations, f"{case}\n" + "\n".join(violations)


def test_the_suite_draws_skip_connections_and_concatenations():
    """The strategy reaches every merge (a suite that never drew one would prove nothing)."""
    from hypothesis import Phase, find, settings

    quick = settings(phases=[Phase.generate], database=None, max_examples=2000)  # found, not shrunk
    for kind in ("sum", "diff", "scale", "cat", "mul", "act"):
        find(dag_cases(), lambda c, kind=kind: any(op[0] == kind for op in c.ops), settings=quick)
    find(dag_cases(), lambda c: any(op[0] == "sum" and op[2] - op[1] >= 2 for op in c.ops), settings=quick)


def test_a_wrong_merge_rule_is_caught(monkeypatch):
    """The suite can fail: a sum rule that forgets one branch is found out on a residual case."""
    from smoothchain.graph import Sum

    monkeypatch.setattr(Sum, "constants", lambda self, inputs: tuple(x / 1000 for x in inputs[0]))
    case = Case(3, [("layer", 0, 3, "tanh"), ("sum", 0, 1), ("layer", 2, 2, "none")], batch=2, radius=0.5, seed=1)
    assert run_case(case)


@examples(60)
@given(dag_cases())
def test_random_graphs_as_chains_of_blocks(case):
    """chain_of_blocks on random DAGs: the blocks applied in order compute the module with its
    own parameter tensors, and the DP gradient over them (RH Prop. C.2) equals torch.autograd's."""
    from smoothchain.oracles import gradient_step
    from smoothchain.torch_graph import chain_of_blocks

    model = case.build()
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.batch, case.d_in, generator=gen, dtype=DT)
    chain = chain_of_blocks(model)
    torch.testing.assert_close(chain(x), model(x), rtol=0, atol=0)
    assert sorted(id(p) for p in chain.parameters()) == sorted(id(p) for p in model.parameters())
    y = torch.randn_like(model(x))
    g = gradient_step(model, x, y, loss="square", gamma=1.0, method="dp")
    loss = 0.5 * (model(x) - y).pow(2).sum() / case.batch
    params = list(model.parameters())
    ref = torch.autograd.grad(loss, params, allow_unused=True)  # a branch may lead nowhere
    for d, r, p in zip(g.direction, ref, params):
        torch.testing.assert_close(d, torch.zeros_like(p) if r is None else -r, rtol=1e-10, atol=1e-12)
