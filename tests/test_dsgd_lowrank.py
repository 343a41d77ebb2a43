"""The fast q = 2 route (smoothchain.dsgd.lowrank, hooks in smoothchain.optim.DSGD) against an
independent dense SVD, and the certified quantities it relies on (issue 5 item 4):

* nuclear norm from the m x m core = sum of singular values (numpy SVD), also with a bias column,
  rank-deficient factors (Cholesky jitter) and float32;
* the certified ``ip`` <= <G, Q^> and ``bound`` >= ||Q^||_2 (numpy SVD of the returned Q^);
* DSGD with hooks (batch < layer sizes) makes the same choices and updates as method="svd";
* the incremental weight-norm bounds of large q = 2 layers stay >= the exact spectral norm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from smoothchain.dsgd.lowrank import certified_direction, polar_core, small_direction, small_polar  # noqa: E402
from smoothchain.optim import DSGD  # noqa: E402

CASES = [  # (r, m, c, bias, dtype, rank-deficient inputs)
    ("f64", 30, 7, 50, False, torch.float64, False),
    ("f64-bias", 25, 9, 40, True, torch.float64, False),
    ("f32-bias", 40, 12, 60, True, torch.float32, False),
    ("dup-rows", 20, 8, 30, True, torch.float64, True),
    ("f32-dup", 20, 8, 30, False, torch.float32, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_core_nuclear_norm_and_certificates(case):
    _, r, m, c, bias, dtype, dup = case
    g = torch.Generator().manual_seed(r * 7 + m)
    A = torch.randn(r, m, generator=g, dtype=torch.float64).to(dtype)
    X = torch.rand(m, c, generator=g, dtype=torch.float64).to(dtype)
    if dup:
        X[1] = X[0]
        X[3] = X[2]
    Xa = torch.cat([X, torch.ones(m, 1, dtype=dtype)], 1) if bias else X
    G64 = A.double() @ Xa.double()
    sv = np.linalg.svd(G64.numpy(), compute_uv=False)
    core = polar_core(A, X, ones_column=bias)
    tol = 1e-9 if dtype == torch.float64 and not dup else 1e-5
    assert core.nuclear == pytest.approx(sv.sum(), rel=tol)
    if dup and dtype == torch.float64:
        assert core.jitter > 0  # exactly singular Kb: regularised Cholesky
    G = (A @ Xa)
    Garg = (G[:, :c], G[:, c]) if bias else G
    QW, qb, ip, bound = certified_direction(core, A, X, Garg, bias_column=bias)
    Q = torch.cat([QW, qb[:, None]], 1) if bias else QW
    true_ip = float((G.double() * Q.double()).sum())
    true_norm = np.linalg.svd(Q.double().numpy(), compute_uv=False)[0]
    assert ip <= true_ip and bound >= true_norm
    # and they are tight: the certified dual norm ip / bound is ||G||_* up to rounding
    assert ip / bound == pytest.approx(sv.sum(), rel=1e-6 if dtype == torch.float64 else 5e-3)


def test_dense_core_matches_svd_polar_factor():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(6, 11, generator=g, dtype=torch.float64)
    core = polar_core(None, G)
    Q, _, ip, bound = certified_direction(core, None, G, G)
    U, S, Vt = np.linalg.svd(G.numpy(), full_matrices=False)
    np.testing.assert_allclose(Q.numpy(), U @ Vt, atol=1e-10)
    assert ip == pytest.approx(S.sum(), rel=1e-12) and 1.0 <= bound <= 1 + 1e-10


def _net(seed, widths=(80, 70, 5)):  # layer 1: min(r, c) = 70 > 64, hooked
    torch.manual_seed(seed)
    mods = []
    for a, b in zip(widths, widths[1:]):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.uniform_(-1, 1)
            lin.bias.uniform_(-1, 1)
        mods += [lin, nn.Sigmoid()]
    return nn.Sequential(*mods).double()


def _rank_restricted_rho(G: np.ndarray):
    """F eq. (28) exactly: ||G||_* sum_{i <= rank} u_i v_i^T (numpy SVD)."""
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    k = int((S > 1e-10 * S[0]).sum())
    return S.sum(), S.sum() * U[:, :k] @ Vt[:k]


def _aug(lin, grad=False):
    W = lin.weight.grad if grad else lin.weight
    b = lin.bias.grad if grad else lin.bias
    return torch.cat([W, b[:, None]], 1).detach().numpy().copy()


@pytest.mark.parametrize("variant", ["greedy", "all"])
def test_hooked_dsgd_matches_svd_reference(variant):
    """Batch 8 < layer sizes: the factored route; every update equals -(1/p_i^2) rho(g_i) with
    F eq. (28) from a numpy SVD, and greedy picks argmax ||g_i||_* / p_i."""
    net = _net(1)
    lins = [m for m in net if isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(2)
    opt = DSGD(net, q=2, variant=variant, mode="stochastic")
    assert opt._hooks
    for _ in range(10):
        x = torch.rand(8, 80, generator=g, dtype=torch.float64)
        z = torch.rand(8, 5, generator=g, dtype=torch.float64)
        opt.zero_grad()
        ((net(x) - z) ** 2).sum(1).mean().backward()
        assert opt._factors(0, *opt._grads(0)) is not None
        before = [_aug(lin) for lin in lins]
        refs = [_rank_restricted_rho(_aug(lin, grad=True)) for lin in lins]
        opt.step()
        p = opt.last_p
        if variant == "greedy":
            assert opt.last_layers == [int(np.argmax([N / pi for (N, _), pi in zip(refs, p)])) + 1]
        for i, lin in enumerate(lins):
            step = -refs[i][1] / p[i] ** 2 if i + 1 in opt.last_layers else 0 * before[i]
            np.testing.assert_allclose(_aug(lin) - before[i], step, rtol=1e-7, atol=1e-13)


def test_an_untouched_gradient_is_matched_without_the_probe(monkeypatch):
    """Autograd's own gradient, unmodified, one record per pass (two passes accumulated here):
    the records are matched by the bias alone; the step is still F eq. (28) exactly."""
    import smoothchain.optim.dsgd as dsgd_mod

    calls = []
    probe = dsgd_mod._probe
    monkeypatch.setattr(dsgd_mod, "_probe", lambda *a: calls.append(1) or probe(*a))
    net = _net(6)
    lins = [m for m in net if isinstance(m, nn.Linear)]
    opt = DSGD(net, q=2, variant="all", mode="stochastic")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 6, 80, generator=g, dtype=torch.float64)
    z = torch.rand(2, 6, 5, generator=g, dtype=torch.float64)
    opt.zero_grad()
    for k in range(2):  # gradient accumulation over two passes
        ((net(x[k]) - z[k]) ** 2).sum(1).mean().backward()
    assert opt._untouched(0) and len(opt._records[0]) == 2
    assert opt._factors(0, *opt._grads(0)) is not None
    before = [_aug(lin) for lin in lins]
    refs = [_rank_restricted_rho(_aug(lin, grad=True)) for lin in lins]
    opt.step()
    assert not calls
    for i, lin in enumerate(lins):
        np.testing.assert_allclose(_aug(lin) - before[i], -refs[i][1] / opt.last_p[i] ** 2, rtol=1e-7, atol=1e-13)


@pytest.mark.parametrize("change", ["clip", "replace", "scale_bias"])
def test_a_modified_gradient_is_not_trusted(change):
    net = _net(8)
    lin = net[0]
    opt = DSGD(net, q=2, mode="stochastic")
    x = torch.rand(8, 80, dtype=torch.float64)
    ((net(x) - 0.5) ** 2).sum(1).mean().backward()
    assert opt._untouched(0)
    with torch.no_grad():
        if change == "clip":
            lin.weight.grad.mul_(0.5)  # in place: the version counter moves
        elif change == "replace":
            lin.weight.grad = lin.weight.grad * 0.5
        else:  # the weight gradient untouched, the bias's rescaled: the bias test catches it
            lin.bias.grad.mul_(0.5)
    assert opt._untouched(0) == (change == "scale_bias")
    assert opt._factors(0, *opt._grads(0)) is None  # the records no longer describe .grad
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_stale_records_fall_back_to_dense():
    net = _net(4)
    opt = DSGD(net, q=2, mode="stochastic")
    x = torch.rand(8, 80, dtype=torch.float64)
    z = torch.rand(8, 5, dtype=torch.float64)
    ((net(x) - z) ** 2).sum(1).mean().backward()
    net.zero_grad()  # not the optimizer's zero_grad: records become stale
    ((net(x[:4]) - z[:4]) ** 2).sum(1).mean().backward()
    assert opt._factors(0, *opt._grads(0)) is None  # 2 records, their sum is not .grad
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_incremental_norm_bounds_stay_upper_bounds():
    net = _net(5, widths=(90, 80, 70, 4))  # layers 2, 3 have min(r, c) > 64
    opt = DSGD(net, q=2, variant="sequential", bound_scaling=False, lr=0.5, norm_refresh=7)
    x = torch.rand(16, 90, dtype=torch.float64)
    z = torch.rand(16, 4, dtype=torch.float64)
    incremental = 0
    for _ in range(20):
        opt.zero_grad()
        ((net(x) - z) ** 2).sum(1).mean().backward()
        opt.step()
        for i in (1, 2):
            bound = opt._norm_bound(i)
            W = torch.cat([opt._layers[i].linear.weight, opt._layers[i].linear.bias[:, None]], 1)
            exact = np.linalg.svd(W.detach().numpy(), compute_uv=False)[0]
            assert bound >= exact
            incremental += opt._norm_cache[i][3] > 0
    assert incremental > 0  # the increments were used, not only exact recomputation


@pytest.mark.parametrize("variant", ["greedy", "all"])
def test_q2_routes_agree(variant):
    """method="svd" (LAPACK SVD of the dense gradient), "gram" (the dense m x m core) and
    "auto" (hook-recorded factors) make the same choices and the same updates."""
    nets = {m: _net(7) for m in ("svd", "gram", "auto")}
    opts = {m: DSGD(n, q=2, variant=variant, method=m, mode="stochastic") for m, n in nets.items()}
    assert opts["auto"]._hooks and not opts["svd"]._hooks
    g = torch.Generator().manual_seed(8)
    for _ in range(6):
        x = torch.rand(8, 80, generator=g, dtype=torch.float64)
        z = torch.rand(8, 5, generator=g, dtype=torch.float64)
        for m, net in nets.items():
            opts[m].zero_grad()
            ((net(x) - z) ** 2).sum(1).mean().backward()
            opts[m].step()
        assert opts["svd"].last_layers == opts["gram"].last_layers == opts["auto"].last_layers
        ref = [p.detach() for p in nets["svd"].parameters()]
        for m in ("gram", "auto"):
            for a, b in zip(ref, nets[m].parameters()):
                torch.testing.assert_close(b.detach(), a, rtol=1e-7, atol=1e-12)


# ---- the small dense route (min(r, c) <= 64, CPU, NumPy) --------------------------------------
@settings(max_examples=60, deadline=None)
@given(r=st.integers(1, 64), extra=st.integers(0, 150), rank=st.integers(1, 64),
       dtype=st.sampled_from([torch.float32, torch.float64]), scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e15]),
       seed=st.integers(0, 2**16))
def test_small_route_is_the_polar_factor_with_certified_ip_and_bound(r, extra, rank, dtype, scale, seed):
    c = r + extra
    g = torch.Generator().manual_seed(seed)
    k = min(rank, r)
    G = (torch.randn(r, k, generator=g, dtype=torch.float64) @ torch.randn(k, c, generator=g, dtype=torch.float64))
    G = (G * scale).to(dtype)
    sp = small_polar(G)
    G64 = G.to(torch.float64)
    S = torch.linalg.svdvals(G64)
    assert sp.nuclear == pytest.approx(float(S.sum()), rel=1e-6)
    Q, ip, bound = small_direction(sp, dtype)
    assert Q.dtype == dtype and Q.shape == G.shape
    Qd = Q.to(torch.float64)
    exact_ip = math.fsum((G64 * Qd).reshape(-1).tolist())  # products exact: float32 x float32 in float64
    assert ip <= exact_ip
    assert bound >= float(torch.linalg.matrix_norm(Qd, ord=2))
    assert ip / bound <= float(S.sum()) * (1 + 1e-6)  # the certified dual norm never exceeds ||G||_*
    assert ip / bound >= float(S.sum()) * (1 - 1e-3)  # and is not loose


def test_small_route_zero_gradient():
    sp = small_polar(torch.zeros(3, 7))
    assert sp.nuclear == 0.0
    assert small_direction(sp, torch.float32) == (None, 0.0, 1.0)


@pytest.mark.parametrize("transposed", [False, True])
def test_small_route_takes_the_bias_column_and_the_transpose(transposed):
    g = torch.Generator().manual_seed(5)
    GW, gb = torch.randn(9, 4, generator=g), torch.randn(9, generator=g)
    G = torch.cat([GW, gb[:, None]], 1)
    sp = small_polar(GW, gb, transposed)
    ref = small_polar(G.T.contiguous() if transposed else G)
    assert sp.nuclear == ref.nuclear and np.array_equal(sp.G64, ref.G64)
