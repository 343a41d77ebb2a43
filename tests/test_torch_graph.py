"""Modules with skip connections read by torch.fx (smoothchain.torch_graph, issue 13).

References: the chain reader on the same Sequential models (an independent walk of the module,
itself tested against the reference recursion); estimates at points of C by the estimators of
smoothchain.estimators (lower bounds) on the traced modules' own forward.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cases import CHAINS, DT, build, functional_output, point_in_balls
from smoothchain import certify
from smoothchain.certificate import build_chain
from smoothchain.chain import ChainError
from smoothchain.cli import main
from smoothchain.components import UnsupportedModuleError
from smoothchain.recursion import chain_bounds, graph_bounds
from smoothchain.torch_graph import graph_from_module

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from resnet import BasicBlock, ResNet, digits_resnet  # noqa: E402


def _close(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=1e-12))


@pytest.mark.parametrize("case", CHAINS, ids=[c.id for c in CHAINS])
@pytest.mark.parametrize("mode", ["paper", "tight"])
def test_traced_sequential_is_the_chain(case, mode):
    """A Sequential read through torch.fx gives the chain's certificate (1e-12 relative)."""
    model, x, _ = build(case)
    shape, m = tuple(x.shape[1:]), x.shape[0]
    chain = build_chain(model, input_shape=shape, batch_size=m, mode=mode, radius=0.7, input_norm=1.3)
    graph = graph_from_module(model, shape, m, mode=mode, radius=0.7, input_norm=1.3).graph
    a, b = chain_bounds(chain), graph_bounds(graph)
    assert len(b.layers) == len(a.layers) and all(n.kind in ("input", "layer") for n in b.nodes)
    for ra, rb in zip(a.layers, b.layers):
        for k in ("output_bound", "lipschitz", "smoothness"):
            assert _close(getattr(rb, k), getattr(ra, k)), (ra.name, k, getattr(rb, k), getattr(ra, k))


class Merges(nn.Module):
    """Every merge: a projection shortcut, an identity shortcut, a scaling, a concatenation, a
    product and functional activations."""

    def __init__(self, d=4):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(3 * d, 2)
        self.act = nn.Softplus()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        r = self.proj(h) + self.act(self.b(h))           # projection shortcut
        s = 0.5 * (r - h)                                 # identity shortcut, scaling
        g = torch.sigmoid(self.c(s)) * s                  # a gate (product)
        return self.head(torch.cat([g, s, torch.tanh(r)], dim=1))


@pytest.mark.parametrize("net_fn, shape", [(Merges, (4,)), (digits_resnet, (1, 8, 8))],
                         ids=["merges", "digits-resnet"])
@pytest.mark.parametrize("mode", ["paper", "tight"])
@pytest.mark.parametrize("around", [False, True])
def test_traced_graph_certificate_survives_estimates_on_C(net_fn, shape, mode, around):
    from smoothchain.estimators import jacobian_norm, output_norm, second_derivative_norm

    torch.manual_seed(1)
    net = net_fn().double()
    batch, radius, input_norm = 3, 0.3, 1.0
    cert = certify(net, input_shape=shape, batch_size=batch, radius=radius, input_norm=input_norm, mode=mode,
                   around_weights=around, loss="square")
    b = cert.bounds
    assert math.isfinite(b.smoothness) and cert.objective.step_size > 0
    g = torch.Generator().manual_seed(7)
    x = torch.randn((batch,) + shape, generator=g, dtype=DT)
    x = x * (input_norm / x.norm())
    psi = functional_output(net, x)
    centre = torch.cat([p.detach().reshape(-1) for p in net.parameters()]) if around else None
    for i in range(2):
        w = point_in_balls(net, radius, g, boundary=i == 0, centre=centre)
        assert output_norm(psi, w).value <= b.output_bound * (1 + 1e-9)
        assert jacobian_norm(psi, w, iters=30, seed=i).value <= b.lipschitz * (1 + 1e-9)
        assert second_derivative_norm(psi, w, iters=6, seed=i, restarts=1, lanczos_iters=30, max_basis=8).value \
            <= b.smoothness * (1 + 1e-9)


def test_residual_block_graph_shape():
    net = nn.Sequential(BasicBlock(4, 8, stride=2))  # projection shortcut inside a Sequential
    g = graph_from_module(BasicBlock(4, 8, stride=2), (4, 6, 6), 2).graph
    kinds = [n.kind for n in g.nodes]
    assert kinds.count("sum") == 1 and kinds[-1] == "layer"  # the ReLU after the sum
    (s,) = [n for n in g.nodes if n.kind == "sum"]
    assert len(s.inputs) == 2 and s.inputs[0] != s.inputs[1]
    assert certify(net, input_shape=(4, 6, 6), batch_size=2).bounds.output_bound > 0


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class AddsAConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) + 1.0


class HoldsATensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


class HasAnLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.rnn = nn.Linear(3, 3), nn.GRUCell(3, 3)

    def forward(self, x):
        return self.rnn(self.fc(x)) + x


@pytest.mark.parametrize("net, match", [
    (Branchy(), "cannot trace Branchy with torch.fx"),
    (AddsAConstant(), "has no rule in smoothchain"),
    (HoldsATensor(), "reads the tensor 'w' directly"),
], ids=["control-flow", "constant", "raw-parameter"])
def test_untraceable_or_unsupported_is_one_clear_error(net, match):
    with pytest.raises(ChainError, match=match):
        certify(net, input_shape=(3,), batch_size=2)


def test_unregistered_leaf_in_a_graph_names_it():
    with pytest.raises(UnsupportedModuleError, match="'rnn'.*GRUCell.*register"):
        certify(HasAnLSTM(), input_shape=(3,), batch_size=2)


def test_cli_certifies_resnet18_from_torch_nn(capsys):
    """The acceptance command on ResNet-18 written from torch.nn (torchvision's structure)."""
    code = main(["certify", "--module", f"{ROOT / 'examples' / 'resnet.py'}:resnet18", "--input-shape",
                 "3,224,224", "--batch-size", "128", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert isinstance(doc["chain"]["lipschitz"], float) and math.isfinite(doc["chain"]["lipschitz"])
    assert doc["chain"]["smoothness"] == "inf"  # ReLU and max pooling: not C^1 (RH Sec. 5)
    # stem (conv, batch-norm affine), 8 blocks (2 convs, 2 affines, the ReLU after the sum), 3
    # projections (conv, affine), fc
    assert len(doc["layers"]) == 2 + 8 * 5 + 3 * 2 + 1


def _torchvision_models():
    try:
        import torchvision.models as tv
    except Exception as err:  # not installed, or e.g. a CUDA build of torchvision next to a CPU torch
        if os.environ.get("SMOOTHCHAIN_REQUIRE_TORCHVISION"):  # .ci/run's torchvision step: no skipping
            raise
        pytest.skip(f"torchvision does not import: {type(err).__name__}: {err}")
    return tv


def test_torchvision_resnet18_certifies_as_it_is():
    tv = _torchvision_models()
    a = certify(tv.resnet18(), input_shape=(3, 224, 224), batch_size=4, mode="tight")
    torch.manual_seed(0)
    b = certify(ResNet(), input_shape=(3, 224, 224), batch_size=4, mode="tight")
    # the same layers (torchvision computes the projection shortcut after the block, ours before)
    assert a.bounds.layers and sorted(r.name for r in a.bounds.layers) == sorted(r.name for r in b.bounds.layers)
    assert a.bounds.lipschitz == pytest.approx(b.bounds.lipschitz, rel=1e-12)  # paper/tight need no weights


@pytest.mark.parametrize("net_fn, shape, around", [(Merges, (4,), False), (Merges, (4,), True),
                                                   (digits_resnet, (1, 8, 8), True)],
                         ids=["merges", "merges-around", "digits-resnet-around"])
def test_check_on_graphs_finds_no_violation(net_fn, shape, around):
    """check on modules with skip connections: every layer node whose value an operation computes
    is estimated (per-node rows), the objective too, and nothing exceeds its bound."""
    from smoothchain.check import check

    torch.manual_seed(0)
    res = check(net_fn(), input_shape=shape, batch_size=2, radius=0.3, around_weights=around, mode="tight",
                points=1, ascent_steps=1, iters=8)
    assert res.violations == ()
    estimated = [r for r in res.layers if r.estimated["lipschitz"] is not None]
    assert len(estimated) >= len(res.layers) // 2 and res.layers[-1] in estimated
    for r in estimated:
        for k, v in r.estimated.items():
            assert 0 < v <= r.certified[k] * (1 + 1e-9), (r.name, k)
    assert 0 < res.estimated["objective_smoothness"] <= res.certified["objective_smoothness"]
    merges = [r for r in res.layers if r.kind in ("sum", "concat", "product")]
    assert merges and all(r.estimated["output_bound"] is not None for r in merges)  # a row per merge node


def test_cli_check_on_the_digits_resnet(capsys, tmp_path):
    code = main(["check", "--module", f"{ROOT / 'examples' / 'resnet.py'}:digits_resnet", "--input-shape", "1,8,8",
                 "--points", "1", "--ascent-steps", "0", "--iters", "5", "--plot", str(tmp_path / "c.png"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["violations"] == [] and (tmp_path / "c.png").stat().st_size > 0
    ratios = [r["ratio"]["lipschitz"] for r in doc["layers"] if r["ratio"]["lipschitz"] is not None]
    assert ratios and all(0 < q <= 1 for q in ratios)


# --------------------------------------------------------------------------- oracles on graphs
def test_gradient_and_gauss_newton_steps_on_a_graph():
    """RH Sec. 3 on graphs: the gradient step by autodiff equals torch.autograd's gradient, the
    Gauss-Newton step by the dual (Prop. 3.5) equals the dense Gauss-Newton solve."""
    from smoothchain.oracles import gauss_newton_step, gradient_step

    torch.manual_seed(3)
    net = Merges().double()
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 2, (5,))
    g = gradient_step(net, x, y, loss="cross-entropy", l2=0.1, gamma=0.5, method="autodiff")
    loss = nn.functional.cross_entropy(net(x), y) + 0.05 * sum(p.pow(2).sum() for p in net.parameters())
    ref = torch.autograd.grad(loss, list(net.parameters()))
    for d, r in zip(g.direction, ref):
        torch.testing.assert_close(d, -0.5 * r, rtol=1e-10, atol=1e-12)
    assert g.oracle_calls == 1
    dual = gauss_newton_step(net, x, y, loss="cross-entropy", l2=0.1, gamma=0.5, method="dual")
    dense = gauss_newton_step(net, x, y, loss="cross-entropy", l2=0.1, gamma=0.5, method="dense")
    for a, b in zip(dual.direction, dense.direction):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


class Blocks(nn.Module):
    """Residual blocks between single operations, defined out of parameter order (the head's
    parameters come first in ``parameters()``), with a parameter read directly (``scale``)."""

    def __init__(self, d=3):
        super().__init__()
        self.head = nn.Linear(d, 2)
        self.stem = nn.Linear(4, d)
        self.a1, self.b1 = nn.Linear(d, d), nn.Linear(d, d)
        self.a2 = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = h + self.b1(torch.tanh(self.a1(h)))           # a block
        h = torch.tanh(h)
        h = self.scale * h + torch.sigmoid(self.a2(h))    # a block with a direct parameter
        return self.head(h)


@pytest.mark.parametrize("net_fn", [Merges, Blocks], ids=["merges", "blocks"])
def test_dp_steps_on_a_graph_run_over_its_chain_of_blocks(net_fn):
    """The DP of RH Algo. 4 on a graph cut into a chain of blocks (chain_of_blocks): gradient =
    torch.autograd, Gauss-Newton and Newton = the dense solves, directions in parameters() order."""
    from smoothchain.oracles import gauss_newton_step, gradient_step, newton_step
    from smoothchain.torch_graph import chain_of_blocks

    torch.manual_seed(4)
    net = net_fn().double()
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 2, (6,))
    chain = chain_of_blocks(net)
    torch.testing.assert_close(chain(x), net(x), rtol=0, atol=0)
    assert {id(p) for p in chain.parameters()} == {id(p) for p in net.parameters()}
    if net_fn is Blocks:
        assert len(chain) >= 4  # stem, two blocks, head: cut between them
    g = gradient_step(net, x, y, loss="cross-entropy", l2=0.1, gamma=0.5, method="dp")
    loss = nn.functional.cross_entropy(net(x), y) + 0.05 * sum(p.pow(2).sum() for p in net.parameters())
    for d, r in zip(g.direction, torch.autograd.grad(loss, list(net.parameters()))):
        torch.testing.assert_close(d, -0.5 * r, rtol=1e-10, atol=1e-12)
    for step in (gauss_newton_step, newton_step):
        dp = step(net, x, y, loss="cross-entropy", l2=0.1, gamma=0.5, method="dp")
        dense = step(net, x, y, loss="cross-entropy", l2=0.1, gamma=0.5, method="dense")
        assert dp.gamma == dense.gamma
        for a, b in zip(dp.direction, dense.direction):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_dp_steps_on_an_untraceable_module_say_what_to_use():
    from smoothchain.oracles import gradient_step, newton_step

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)  # data-dependent: torch.fx cannot trace it

    class Shared(nn.Module):  # one parameter read by two blocks: no chain of blocks
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            h = torch.tanh(self.scale * self.a(x))
            return self.b(self.scale * h)

    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="used twice or parameters are shared"):
        gradient_step(Shared(), x, y, loss="cross-entropy", gamma=1.0)
    with pytest.raises(TypeError, match="needs a chain.*cannot trace Branchy.*use method='autodiff'"):
        gradient_step(Branchy(), x, y, loss="cross-entropy", gamma=1.0)
    with pytest.raises(TypeError, match="needs a chain.*use method='dense'"):
        newton_step(Branchy(), x, y, loss="cross-entropy", gamma=1.0)


@pytest.mark.parametrize("case", CHAINS[:3], ids=[c.id for c in CHAINS[:3]])
def test_gradient_by_autodiff_equals_the_dp_on_chains(case):
    from smoothchain.oracles import gradient_step

    model, x, y = build(case)
    a = gradient_step(model, x, y, loss=case.loss, l2=case.l2, gamma=0.3, method="autodiff")
    b = gradient_step(model, x, y, loss=case.loss, l2=case.l2, gamma=0.3, method="dp")
    for u, v in zip(a.direction, b.direction):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_torchvision_resnet18_cli_acceptance(tmp_path, capsys):
    """Issue 13's command on torchvision's own resnet18(): exit 0, a finite Lipschitz bound."""
    _torchvision_models()
    f = tmp_path / "tv.py"
    f.write_text("from torchvision.models import resnet18\n")
    code = main(["certify", "--module", f"{f}:resnet18", "--input-shape", "3,224,224", "--batch-size", "128",
                 "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and math.isfinite(doc["chain"]["lipschitz"])
