"""Tests of the optimization oracles (smoothchain.oracles; RH Sec. 3 and App. C).

* every structured method ("dp", "dual") against the dense float64 reference ("dense": full
  Jacobian / Hessian with torch.func, direct solves), to 1e-8 relative, on seeded small chains
  (Linear and Conv2d layers, biases or not, tanh / sigmoid / softplus / pooling, nested
  Sequential, both losses, l2 > 0 and l2 = 0), plus a hypothesis sweep of random MLPs;
* the gradient step by DP against plain autograd (Prop. C.2: it is back-propagation);
* Prop. 3.1's LQ problem (15) against the dense quadratic models (27)-(29) at random points;
* the Gauss-Newton dual's call count <= 2q+1, checked by counting the vjp closures and the
  jvps that actually run;
* Newton with an infeasible gamma (negative curvature): halving, the reported gamma and flag;
* argument validation.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from smoothchain.oracles import (  # noqa: E402
    AutodiffOracle,
    OracleCounter,
    StepResult,
    gauss_newton_step,
    gradient_step,
    newton_step,
)
from smoothchain.oracles import autodiff as ad  # noqa: E402
from smoothchain.oracles.dense import DenseProblem, newton_hessian  # noqa: E402
from smoothchain.oracles.lq import (  # noqa: E402
    assemble_lq,
    lq_objective,
    solve_lq,
    split_layers,
)

from cases import CHAINS, DT, build, flat, rel_err  # noqa: E402

RTOL = 1e-8



# ----------------------------------------------------------------------------- cases
CASES = CHAINS


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request):
    c = request.param
    model, x, y = build(c)
    return c, model, x, y


# ----------------------------------------------------------------------------- helpers
def ref_loss(loss, y):
    """The losses written independently of the library's loss table: PyTorch's own
    ``cross_entropy`` (mean; class indices or probabilities) and ``mse_loss`` (sum / 2m)."""
    import torch.nn.functional as tF

    if loss == "cross-entropy":
        return lambda z: tF.cross_entropy(z, y, reduction="mean")
    assert loss == "square", loss
    return lambda z: tF.mse_loss(z, y.reshape(z.shape), reduction="sum") / (2 * z.shape[0])


def objective(model, x, y, loss, l2):
    f = ref_loss(loss, y)
    return f(model(x)) + 0.5 * l2 * sum((p ** 2).sum() for p in model.parameters())


def newton_spectrum(model, x, y, loss, l2):
    prob = DenseProblem(model, x, ref_loss(loss, y), l2)
    _, hess = newton_hessian(prob, OracleCounter())
    return torch.linalg.eigvalsh(hess)


def feasible_gamma(model, x, y, loss, l2):
    """A gamma well inside the feasible range of the Newton step (14)."""
    lam_min = float(newton_spectrum(model, x, y, loss, l2)[0])
    return min(0.7, 0.5 / -lam_min) if lam_min < 0 else 0.7


def check_shapes(model, res: StepResult):
    assert isinstance(res, StepResult)
    params = list(model.parameters())
    assert len(res.direction) == len(params)
    for d, p in zip(res.direction, params):
        assert d.shape == p.shape and d.dtype == p.dtype and not d.requires_grad


# ----------------------------------------------------------------------------- gradient (12)
def test_gradient_dp_is_backprop(case):
    """Prop. C.2: the DP solution of (12) is -gamma * autograd gradient of f(psi(w)) + l2/2||w||^2."""
    c, model, x, y = case
    gamma = 0.37
    model.zero_grad()
    objective(model, x, y, c.loss, c.l2).backward()
    expected = [-gamma * p.grad for p in model.parameters()]
    res = gradient_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma)
    check_shapes(model, res)
    assert rel_err(res.direction, expected) < 1e-12
    assert res.oracle_calls == 1 and res.gamma == gamma and res.feasible
    dense = gradient_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma, method="dense")
    assert rel_err(dense.direction, expected) < 1e-12
    # the generic solver of Algo. 4 on the gradient LQ problem (P = R = Q = 0) gives the same
    lq = assemble_lq(model, x, ref_loss(c.loss, y), c.l2, "gradient", OracleCounter())
    sol = solve_lq(lq, gamma)
    assert sol.feasible and sol.tries == 1 and sol.gamma == gamma
    assert rel_err(lq.chain.to_parameters(sol.v), expected) < 1e-12


# ----------------------------------------------------------------------------- Prop. 3.1
def test_lq_problem_is_the_step_model(case):
    """(15) at any v~ equals the model (27)/(28)/(29) minus its constant (Prop. 3.1)."""
    c, model, x, y = case
    f = ref_loss(c.loss, y)
    gamma = 0.8
    prob = DenseProblem(model, x, f, c.l2)
    z, J = prob.jacobian(OracleCounter())
    g = ad.loss_grad(f, z).reshape(-1)
    _, hess = newton_hessian(prob, OracleCounter())
    gen = torch.Generator().manual_seed(0)
    for kind in ("gradient", "gauss-newton", "newton"):
        _check_lq(kind, model, x, f, c.l2, gamma, prob, J, z, g, hess, gen)


def _check_lq(kind, model, x, f, l2, gamma, prob, J, z, g, hess, gen):
    lq = assemble_lq(model, x, f, l2, kind, OracleCounter())
    for _ in range(2):
        w = torch.randn(prob.w.numel(), generator=gen, dtype=DT)
        v, start = [], 0
        for layer in lq.chain.layers:
            v.append(w[start:start + layer.numel])
            start += layer.numel
        lin = g @ (J.T @ w) + l2 * prob.w @ w + w @ w / (2 * gamma)
        if kind == "gradient":
            expected = lin
        elif kind == "gauss-newton":
            Jw = J.T @ w
            expected = lin + 0.5 * Jw @ ad.loss_hessian(f, z) @ Jw + 0.5 * l2 * w @ w
        else:
            expected = lin + 0.5 * w @ hess @ w
        got = lq_objective(lq, v, gamma)
        assert abs(float(got - expected)) <= 1e-10 * (1 + abs(float(expected))), kind


# ----------------------------------------------------------------------------- Gauss-Newton (13)
def test_gauss_newton_dual_and_dp_match_dense(case):
    c, model, x, y = case
    q = model(x).numel()
    for gamma in (0.05, 2.0):
        ref = gauss_newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma, method="dense")
        for method in ("dual", "dp"):
            res = gauss_newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma, method=method)
            check_shapes(model, res)
            assert rel_err(res.direction, ref.direction) < RTOL, (method, gamma)
            assert res.gamma == gamma and res.feasible
            if method == "dual":
                assert 1 <= res.oracle_calls <= 2 * q + 1


def test_gauss_newton_dual_call_count_is_measured(case, monkeypatch):
    """Prop. 3.5 (3): <= 2q+1 calls, tallied independently of the oracle's counter: on the vjp
    closures and the chain jvps that really run (jvps of the loss alone, for its Hessian-vector
    products, are not chain sweeps), and by forward hooks on the model, which fire once for the
    oracle's forward pass and once per forward-mode sweep through the chain."""
    c, model, x, y = case
    q = model(x).numel()
    ran = {"forward": 0, "vjp": 0, "chain_jvp": 0, "hook": 0}
    real_vjp, real_jvp = torch.func.vjp, torch.func.jvp

    def vjp(fn, *primals, **kw):
        ran["forward"] += 1
        out, fn_vjp = real_vjp(fn, *primals, **kw)

        def counted(*ct):
            ran["vjp"] += 1
            return fn_vjp(*ct)

        return out, counted

    def jvp(fn, *args, **kw):
        if isinstance(getattr(fn, "__self__", None), AutodiffOracle):
            ran["chain_jvp"] += 1
        return real_jvp(fn, *args, **kw)

    monkeypatch.setattr(torch.func, "vjp", vjp)
    monkeypatch.setattr(torch.func, "jvp", jvp)
    handle = model.register_forward_hook(lambda *a: ran.__setitem__("hook", ran["hook"] + 1))
    try:
        res = gauss_newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=0.3)
    finally:
        handle.remove()
        monkeypatch.undo()
    n_iter = ran["vjp"]
    assert 1 <= n_iter <= q and ran["forward"] == 1
    assert ran["chain_jvp"] == ran["hook"] - 1 == n_iter + (1 if c.l2 else 0)
    assert res.oracle_calls == ran["vjp"] + ran["chain_jvp"] <= 2 * q + 1
    ref = gauss_newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=0.3, method="dense")
    assert rel_err(res.direction, ref.direction) < RTOL


def test_autodiff_oracle_against_jacobian(case):
    c, model, x, y = case
    oracle = AutodiffOracle(model, x)
    prob = DenseProblem(model, x, ref_loss(c.loss, y), c.l2)
    z, J = prob.jacobian(OracleCounter())
    assert torch.allclose(oracle.output, z, rtol=1e-13, atol=1e-13)
    mu = torch.randn(z.numel(), dtype=DT)
    wt = torch.randn(prob.w.numel(), dtype=DT)
    assert torch.allclose(flat(oracle.backward(mu)), J @ mu, rtol=1e-12, atol=1e-12)
    assert torch.allclose(oracle.linearize(prob.unflatten(wt)).reshape(-1), J.T @ wt,
                          rtol=1e-12, atol=1e-12)
    assert (oracle.counter.forward_passes, oracle.counter.backward_calls,
            oracle.counter.linearize_calls, oracle.counter.calls) == (1, 1, 1, 2)


def test_gauss_newton_dual_on_a_non_sequential_module():
    """The dual only needs the autodiff oracle: any nn.Module works; the DP runs over its chain of blocks."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) + x)

    torch.manual_seed(7)
    model = Net().to(DT)
    x, y = torch.randn(2, 3, dtype=DT), torch.tensor([0, 1])
    res = gauss_newton_step(model, x, y, loss="cross-entropy", l2=0.1, gamma=0.5)
    ref = gauss_newton_step(model, x, y, loss="cross-entropy", l2=0.1, gamma=0.5, method="dense")
    assert rel_err(res.direction, ref.direction) < RTOL
    # the DP runs over the module's chain of blocks (torch_graph.chain_of_blocks)
    dp = newton_step(model, x, y, loss="cross-entropy", gamma=0.5)
    assert rel_err(dp.direction, newton_step(model, x, y, loss="cross-entropy", gamma=0.5,
                                             method="dense").direction) < RTOL


# ----------------------------------------------------------------------------- Newton (14)
def test_newton_dp_matches_dense(case):
    c, model, x, y = case
    gamma = feasible_gamma(model, x, y, c.loss, c.l2)
    ref = newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma, method="dense")
    res = newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma)
    check_shapes(model, res)
    assert ref.feasible and ref.gamma == gamma
    assert res.feasible and res.gamma == gamma
    assert rel_err(res.direction, ref.direction) < RTOL
    assert res.oracle_calls == 1


def _negative_curvature():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    x = torch.randn(4, 2, dtype=DT)
    y = 5.0 * torch.randn(4, 1, dtype=DT)
    return model, x, y


def test_newton_halves_an_infeasible_gamma():
    """With lambda_min(grad^2 F) < 0, gamma0 = 3/|lambda_min| is infeasible (1/gamma0 + lambda_min
    < 0); Algo. 4 halves twice, to gamma0/4 (4/3 |lambda_min| > |lambda_min|), and flags it."""
    model, x, y = _negative_curvature()
    l2 = 0.01
    lam_min = float(newton_spectrum(model, x, y, "square", l2)[0])
    assert lam_min < -1e-2, "test precondition: negative curvature"
    gamma0 = 3.0 / -lam_min
    for method in ("dp", "dense"):
        res = newton_step(model, x, y, loss="square", l2=l2, gamma=gamma0, method=method)
        assert not res.feasible, method
        assert res.gamma == pytest.approx(gamma0 / 4, rel=1e-15), method
    dp = newton_step(model, x, y, loss="square", l2=l2, gamma=gamma0)
    ref = newton_step(model, x, y, loss="square", l2=l2, gamma=gamma0 / 4, method="dense")
    assert ref.feasible and ref.gamma == gamma0 / 4
    assert rel_err(dp.direction, ref.direction) < RTOL
    assert dp.oracle_calls == 1
    # the requested gamma is a saddle of the model: the Gauss-Newton step stays feasible
    gn = gauss_newton_step(model, x, y, loss="square", l2=l2, gamma=gamma0)
    assert gn.feasible and gn.gamma == gamma0


def test_newton_equals_gauss_newton_on_a_linear_chain():
    """psi linear in w (one Linear layer on fixed inputs): grad^2 psi = 0, so (14) = (13)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 3)).to(DT)
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 1])
    a = newton_step(model, x, y, loss="cross-entropy", l2=0.2, gamma=3.0)
    b = gauss_newton_step(model, x, y, loss="cross-entropy", l2=0.2, gamma=3.0)
    assert a.feasible and rel_err(a.direction, b.direction) < RTOL


def test_small_steps_decrease_the_objective(case):
    c, model, x, y = case
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        f0 = float(objective(model, x, y, c.loss, c.l2))
    gamma = min(0.05, feasible_gamma(model, x, y, c.loss, c.l2))
    steps = [gradient_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma),
             gauss_newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma),
             newton_step(model, x, y, loss=c.loss, l2=c.l2, gamma=gamma)]
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # the oracles do not touch the model
    for res in steps:
        with torch.no_grad():
            for p, d in zip(model.parameters(), res.direction):
                p.add_(d)
            f1 = float(objective(model, x, y, c.loss, c.l2))
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
        assert f1 < f0


# ----------------------------------------------------------------------------- random chains
ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


@settings(max_examples=8)
@given(widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       acts=st.lists(st.sampled_from(sorted(ACTS)), min_size=3, max_size=3),
       bias=st.lists(st.booleans(), min_size=3, max_size=3),
       batch=st.integers(1, 3), loss=st.sampled_from(["square", "cross-entropy"]),
       l2=st.sampled_from([0.0, 0.01, 0.5]), gamma=st.sampled_from([0.1, 1.0, 10.0]),
       seed=st.integers(0, 2 ** 16))
def test_random_mlps_match_dense(widths, acts, bias, batch, loss, l2, gamma, seed):
    if loss == "cross-entropy" and widths[-1] < 2:
        widths = widths[:-1] + [2]
    torch.manual_seed(seed)
    mods = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1], bias=bias[i]))
        if i < len(widths) - 2:
            mods.append(ACTS[acts[i]]())
    model = nn.Sequential(*mods).to(DT)
    x = torch.randn(batch, widths[0], dtype=DT)
    y = (torch.randn(batch, widths[-1], dtype=DT) if loss == "square"
         else torch.randint(0, widths[-1], (batch,)))
    kw = dict(loss=loss, l2=l2)
    ref = gauss_newton_step(model, x, y, gamma=gamma, method="dense", **kw)
    for method in ("dual", "dp"):
        res = gauss_newton_step(model, x, y, gamma=gamma, method=method, **kw)
        assert rel_err(res.direction, ref.direction) < RTOL
        if method == "dual":
            assert res.oracle_calls <= 2 * model(x).numel() + 1
    g_newton = feasible_gamma(model, x, y, loss, l2)
    ref = newton_step(model, x, y, gamma=g_newton, method="dense", **kw)
    res = newton_step(model, x, y, gamma=g_newton, **kw)
    assert res.feasible and rel_err(res.direction, ref.direction) < RTOL


@st.composite
def conv_chains(draw):
    """Random small conv-then-linear chains: an optional Conv2d block (1-2 channels in, 1-2 out,
    kernel 1-3, bias or not, an activation, average pooling when the output side is even), then
    Flatten and 1-2 Linear layers with activations in between; both losses, l2 > 0 or 0."""
    c_in, side = draw(st.integers(1, 2)), draw(st.integers(3, 4))
    mods: list[nn.Module] = []
    n_conv = draw(st.integers(1, 2))
    c, s = c_in, side
    for _ in range(n_conv):
        k = draw(st.integers(1, min(3, s)))
        c_out = draw(st.integers(1, 2))
        mods += [nn.Conv2d(c, c_out, k, bias=draw(st.booleans())), ACTS[draw(st.sampled_from(sorted(ACTS)))]()]
        c, s = c_out, s - k + 1
        if s % 2 == 0 and draw(st.booleans()):
            mods.append(nn.AvgPool2d(2))
            s //= 2
    mods.append(nn.Flatten())
    width = c * s * s
    loss = draw(st.sampled_from(["square", "cross-entropy"]))
    n_lin = draw(st.integers(1, 2))
    for i in range(n_lin):
        out = draw(st.integers(2, 3))
        mods.append(nn.Linear(width, out, bias=draw(st.booleans())))
        if i < n_lin - 1:
            mods.append(ACTS[draw(st.sampled_from(sorted(ACTS)))]())
        width = out
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    model = nn.Sequential(*mods).to(DT)
    x = torch.randn(batch, c_in, side, side, dtype=DT)
    y = torch.randn(batch, width, dtype=DT) if loss == "square" else torch.randint(0, width, (batch,))
    return model, x, y, loss, draw(st.sampled_from([0.0, 0.02, 0.3])), draw(st.sampled_from([0.1, 1.0, 10.0]))


@settings(max_examples=10)
@given(conv_chains())
def test_random_conv_chains_match_dense(chain):
    """The acceptance sweep on conv chains: every "dp" / "dual" direction equals "dense" to 1e-8
    relative, the DP gradient step is -gamma x autograd's gradient, the dual's calls <= 2q+1."""
    model, x, y, loss, l2, gamma = chain
    kw = dict(loss=loss, l2=l2)
    model.zero_grad()
    objective(model, x, y, loss, l2).backward()
    expected = [-gamma * p.grad for p in model.parameters()]
    res = gradient_step(model, x, y, gamma=gamma, **kw)
    assert rel_err(res.direction, expected) < 1e-12 and res.oracle_calls == 1
    ref = gauss_newton_step(model, x, y, gamma=gamma, method="dense", **kw)
    q = model(x).numel()
    for method in ("dual", "dp"):
        res = gauss_newton_step(model, x, y, gamma=gamma, method=method, **kw)
        assert rel_err(res.direction, ref.direction) < RTOL, method
        if method == "dual":
            assert res.oracle_calls <= 2 * q + 1
    g_newton = feasible_gamma(model, x, y, loss, l2)
    ref = newton_step(model, x, y, gamma=g_newton, method="dense", **kw)
    res = newton_step(model, x, y, gamma=g_newton, **kw)
    assert res.feasible and res.oracle_calls == 1
    assert rel_err(res.direction, ref.direction) < RTOL


def test_dp_refuses_a_problem_too_large_for_memory(monkeypatch):
    """The DP matrices are sized before any is built (lq_bytes): over the limit, a ValueError that
    names the sizes and the way out, with no work done; under it, the step runs."""
    from smoothchain.oracles import lq as lq_mod

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    # by hand: deltas (15, 20, 10), rhos (16, 10); stored A, B, K + Newton Hessians; transient
    stored = 20 * 16 + (10 * 20 + 10 * 10 + 10 * 20)     # B_1; A_2, B_2, K_2 (A_1, K_1 unused)
    transient = max(2 * 20 * 20 + 16 * 16, 2 * 10 * 10 + 10 * 10)
    assert lq_mod.lq_bytes([15, 20, 10], [16, 10], "gauss-newton") == 8 * (stored + transient)
    newton = stored + 16 ** 2 + (10 + 20) ** 2
    assert lq_mod.lq_bytes([15, 20, 10], [16, 10], "newton") == 8 * (newton + transient)
    monkeypatch.setattr(lq_mod, "MAX_LQ_BYTES", 8 * (newton + transient) - 1)
    with pytest.raises(ValueError, match="GiB of dense layer matrices.*mini-batch"):
        newton_step(model, x, y, loss="square", gamma=0.1)
    gauss_newton_step(model, x, y, loss="square", gamma=0.1, method="dp")   # smaller: fits
    monkeypatch.setattr(lq_mod, "MAX_LQ_BYTES", 8 * (stored + transient) - 1)
    with pytest.raises(ValueError, match="method='dual'"):
        gauss_newton_step(model, x, y, loss="square", gamma=0.1, method="dp")
    monkeypatch.setattr(lq_mod, "MAX_LQ_BYTES", 8 * (newton + transient))
    assert newton_step(model, x, y, loss="square", gamma=0.1).oracle_calls == 1


def test_gauss_newton_dual_in_float32_stops_at_its_precision():
    """float32: CG stops at 10 eps relative residual instead of running all q iterations towards
    1e-13, without a warning, and the direction is the float64 one to float32 accuracy."""
    import warnings

    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x, y = torch.randn(10, 6, dtype=DT), torch.randint(0, 3, (10,))
    ref = gauss_newton_step(model, x, y, loss="cross-entropy", l2=1e-2, gamma=1.0, method="dense")
    model32 = model.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = gauss_newton_step(model32, x.float(), y, loss="cross-entropy", l2=1e-2, gamma=1.0)
    assert res.oracle_calls <= 2 * 30 + 1
    assert rel_err([d.double() for d in res.direction], ref.direction) < 1e-4


# ----------------------------------------------------------------------------- validation
def test_layer_grouping():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(),
                          nn.Sequential(nn.Linear(3, 2), nn.Sigmoid()), nn.Softplus())
    chain = split_layers(model)
    assert [type(m).__name__ for m in chain.pre] == ["Flatten"]
    assert [[type(m).__name__ for m in layer.modules] for layer in chain.layers] == [
        ["Linear", "Tanh"], ["Linear", "Sigmoid", "Softplus"]]
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="shared"):
        split_layers(nn.Sequential(shared, nn.Tanh(), shared))
    with pytest.raises(ValueError, match="no parameters"):
        split_layers(nn.Sequential(nn.Tanh()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="hinge", gamma=1.0), "loss"),
    (dict(loss="square", gamma=0.0), "gamma"),
    (dict(loss="square", gamma=math.inf), "gamma"),
    (dict(loss="square", gamma=1.0, l2=-1.0), "l2"),
    (dict(loss="square", gamma=1.0, method="newton"), "method"),
])
def test_bad_arguments(kwargs, match):
    model = nn.Sequential(nn.Linear(2, 2)).to(DT)
    x, y = torch.randn(1, 2, dtype=DT), torch.randn(1, 2, dtype=DT)
    for step in (gradient_step, gauss_newton_step, newton_step):
        with pytest.raises(ValueError, match=match):
            step(model, x, y, **kwargs)
    with pytest.raises(ValueError, match="method"):
        newton_step(model, x, y, loss="square", gamma=1.0, method="dual")
    with pytest.raises(ValueError, match="targets"):
        gradient_step(model, x, y[:, :1], loss="square", gamma=1.0)
