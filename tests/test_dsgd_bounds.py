"""Layer polynomials p_i(w) of F Prop. 4.3 (smoothchain.dsgd.bounds).

* equal widths, no bias, D = 1: ``layer_bounds`` equals F's formula, re-implemented here
  literally (forward recursions r_n, v_n, s_n and Table 1), and the K = 2 closed forms (24a-b);
* mixed widths with biases: a hand-expanded K = 2 formula with the dimensions derived in
  docs/dsgd.md (c from the layer's input width + 1, d from the output width);
* soundness: on random nets of mixed widths with biases, sigmoid and tanh, data at the bound,
  the layer-wise Hessian norm w.r.t. the operator q-norm -- sup_U |D^2 f[U, U]| / ||U||_q^2,
  estimated from the layer Hessian (``torch.autograd.functional.hessian``; torch.func's first
  call is very slow on this machine) at random directions plus a generalised power ascent
  U <- rho_q(H U) -- never exceeds p_i(w)^2, and the descent step of F Prop. 4.4 decreases f
  by at least ||g_i||_*^2 / (2 p_i^2);
* F Assumption 4.1 violations raise ValueError naming the module / tensor and value.
"""

from __future__ import annotations

import math
import zlib

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.autograd.functional import hessian  # noqa: E402

from smoothchain.dsgd import bounds  # noqa: E402
from smoothchain.dsgd.bounds import check_data, layer_bounds, objective, parse_model  # noqa: E402
from smoothchain.dsgd.norms import dual_norm, duality_map, matrix_norm  # noqa: E402
from smoothchain.dsgd.rates import variance_bound, variance_bound_paper  # noqa: E402

QS = [1, 2, math.inf]
SIG = (0.25, 1 / (6 * math.sqrt(3)))  # ||sigma'||, ||sigma''|| for the logistic sigmoid
TANH = (1.0, 4 / (3 * math.sqrt(3)))


def make_net(widths, act=nn.Sigmoid, bias=True, scale=1.0, seed=0):
    torch.manual_seed(seed)
    mods = []
    acts = act if isinstance(act, (list, tuple)) else [act] * (len(widths) - 1)
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            lin.weight.normal_(0.0, scale / math.sqrt(a))
            if bias:
                lin.bias.normal_(0.0, scale)
        mods += [lin, acts[i]()]
    return nn.Sequential(*mods).double()


def paper_p(zs, K, n, q, dsig, ddsig):
    """F Prop. 4.3 verbatim for equal widths n, one activation, D = 1, no biases.
    zs[k] = ||w_{k+1}||_q (0-based list of the K layer norms)."""
    c = {1: n, 2: math.sqrt(n), math.inf: 1.0}[q]          # Table 1
    d1 = {1: 4.0, 2: 4 * math.sqrt(n), math.inf: 4.0 * n}[q]
    d2 = {1: 2.0, 2: 2.0, math.inf: 2.0 * n}[q]

    def r(z):
        return dsig ** len(z) * math.prod(z)

    def v(z):
        if not z:
            return 0.0
        nn_ = len(z)
        return (ddsig * dsig ** (2 * (nn_ - 1)) * math.prod(x * x for x in z)
                + dsig * z[-1] * v(z[:-1]))

    def s(z):
        return (d2 * c**2 * dsig**2 * r(z) ** 2 + d1 * c**2 * dsig**2 * v(z)
                + d1 * c**2 * ddsig * r(z))

    return [math.sqrt(s(zs[i + 1:K]) + 1) for i in range(K)]  # p_i uses w_{i+1}..w_K


@pytest.mark.parametrize("q", QS, ids=["q1", "q2", "qinf"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_equal_width_matches_paper(q, K, act):
    n = 4
    net = make_net([n] * (K + 1), nn.Sigmoid if act == "sigmoid" else nn.Tanh, bias=False,
                   scale=2.0, seed=K)
    zs = [matrix_norm(m.weight, q) for m in net if isinstance(m, nn.Linear)]
    ref = paper_p(zs, K, n, q, *(SIG if act == "sigmoid" else TANH))
    assert layer_bounds(net, q) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("q", QS, ids=["q1", "q2", "qinf"])
def test_two_layer_closed_form_24(q):
    """F eqs. (24a)-(24b) (with the typos of (24a)'s middle line fixed: d_{q,1}, sigma'')."""
    n = 5
    net = make_net([n, n, n], nn.Sigmoid, bias=False, scale=3.0, seed=1)
    a, b = SIG
    c = {1: n, 2: math.sqrt(n), math.inf: 1.0}[q]
    d1 = {1: 4.0, 2: 4 * math.sqrt(n), math.inf: 4.0 * n}[q]
    d2 = {1: 2.0, 2: 2.0, math.inf: 2.0 * n}[q]
    z2 = matrix_norm(net[2].weight, q)
    p1 = math.sqrt((d2 * c**2 * a**4 + d1 * c**2 * a**2 * b) * z2**2 + d1 * c**2 * b * a * z2 + 1)
    p2 = math.sqrt(c**2 * (d2 * a**2 + d1 * b) + 1)
    assert layer_bounds(net, q) == pytest.approx([p1, p2], rel=1e-12)


@pytest.mark.parametrize("q", QS, ids=["q1", "q2", "qinf"])
@pytest.mark.parametrize("D", [1.0, 0.5, 3.0])
def test_mixed_widths_bias_closed_form(q, D):
    """K = 2, widths 3 -> 7 -> 2 with biases, tanh then sigmoid, data bound D.
    c_1 = ||(D,..,D,1)||_q in R^{3+1}, c_2 = ||1||_q in R^{7+1}, d's on the output width 2."""
    net = make_net([3, 7, 2], [nn.Tanh, nn.Sigmoid], bias=True, scale=2.0, seed=2)
    (a1, b1), (a2, b2) = TANH, SIG
    inv = 0.0 if q == math.inf else 1 / q
    c1 = max(D, 1.0) if q == math.inf else (3 * D**q + 1) ** inv
    c2 = 8**inv
    d1 = 2 * (1 + D) * 2 ** (1 - inv)
    d2 = 2 * 2 ** max(0.0, 1 - 2 * inv)
    W2b = torch.cat([net[2].weight, net[2].bias[:, None]], 1)
    z2 = matrix_norm(W2b, q)
    r1, v1 = a2 * z2, b2 * z2**2
    p1 = math.sqrt(c1**2 * (d2 * a1**2 * r1**2 + d1 * a1**2 * v1 + d1 * b1 * r1) + 1)
    p2 = math.sqrt(c2**2 * (d2 * a2**2 + d1 * b2) + 1)
    assert layer_bounds(net, q, data_bound=D) == pytest.approx([p1, p2], rel=1e-12)


# ------------------------------------------------------------------------------------------
# Soundness: estimated layer-wise Hessian norms stay below p_i(w)^2
# ------------------------------------------------------------------------------------------


def layer_objective(net, i, x, z):
    """f as a function of layer i's matrix [W | b] (0-based i), the other weights fixed."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    target = linears[i]
    n_in = target.in_features
    has_bias = target.bias is not None

    def f(M):
        y = x
        for mod in net:
            if mod is target:
                y = y @ M[:, :n_in].T + (M[:, n_in] if has_bias else 0.0)
            else:
                y = mod(y)
        return (y - z).pow(2).sum(dim=1).mean()

    W = target.weight.detach()
    M0 = torch.cat([W, target.bias.detach()[:, None]], 1) if has_bias else W
    return f, M0.clone()


def hessian_norm_estimate(f, M0, q, gen, n_random=20, n_ascent=15):
    """sup_U |D^2 f(M0)[U, U]| / ||U||_q^2: the layer Hessian H by autograd (``torch.autograd.functional.hessian``), then
    random directions (dense and sparse) and, from the best ones, the generalised power
    iteration U <- rho_q(H U) / ||H U||_* (the maximiser of <H U, V> over ||V||_q <= 1)."""
    shape = M0.shape
    H = hessian(f, M0).reshape(M0.numel(), M0.numel())

    def hvp(U):
        return (H @ U.reshape(-1)).reshape(shape)

    best = 0.0
    starts = []
    for k in range(n_random):
        U = torch.randn(shape, generator=gen, dtype=M0.dtype)
        if k % 2:  # sparse directions suit the q = 1, inf balls
            U = U * (torch.rand(shape, generator=gen) < 0.3)
        nU = matrix_norm(U, q)
        if nU == 0:
            continue
        U = U / nU
        HU = hvp(U)
        val = abs((U * HU).sum().item())
        best = max(best, val)
        starts.append((val, U, HU))
    starts.sort(key=lambda t: -t[0])
    for _, U, HU in starts[:4]:
        for _ in range(n_ascent):
            rho, n = duality_map(HU, q)
            if n == 0:
                break
            U = rho / n  # ||U||_q = 1
            HU = hvp(U)
            best = max(best, abs((U * HU).sum().item()))
    return best


CASES = [  # (id, widths, activations, weight scale, data bound)
    ("sig-3-5-2", [3, 5, 2], [nn.Sigmoid, nn.Sigmoid], 2.0, 1.0),
    ("tanh-4-2-6-3", [4, 2, 6, 3], [nn.Tanh, nn.Tanh, nn.Tanh], 1.5, 1.0),
    ("mix-2-6-1", [2, 6, 1], [nn.Tanh, nn.Sigmoid], 3.0, 2.0),
    ("tanh-1layer-5-4", [5, 4], [nn.Tanh], 0.5, 1.0),
]


@pytest.mark.parametrize("q", QS, ids=["q1", "q2", "qinf"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hessian_estimates_below_bound(case, q):
    _, widths, acts, scale, D = case
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case[0]}-{q}".encode()))
    worst = 0.0
    for trial in range(2):
        net = make_net(widths, acts, bias=True, scale=scale, seed=trial)
        m = 6
        x = D * torch.sign(torch.randn(m, widths[0], generator=gen, dtype=torch.float64))
        if trial == 1:
            x = x * torch.rand(m, widths[0], generator=gen, dtype=torch.float64)
        z = D * (2 * torch.rand(m, widths[-1], generator=gen, dtype=torch.float64) - 1)
        p = layer_bounds(net, q, data_bound=D)
        for i in range(len(widths) - 1):
            f, M0 = layer_objective(net, i, x, z)
            est = hessian_norm_estimate(f, M0, q, gen)
            assert est <= p[i] ** 2 * (1 + 1e-9), (i, est, p[i] ** 2)
            worst = max(worst, est / p[i] ** 2)
    assert worst > 0.0


@pytest.mark.parametrize("q", QS, ids=["q1", "q2", "qinf"])
def test_hessian_estimator_is_not_vacuous(q):
    """One tanh layer at W = 0 with x = (1, .., 1): D^2 f[U, U] = 2 ||U x||_2^2, which the
    estimator must find; it is a sizeable fraction of p^2 (q = inf: 2 n_out / (5.08 n_out + 1))."""
    net = make_net([4, 3], [nn.Tanh], bias=False)
    with torch.no_grad():
        net[0].weight.zero_()
    x = torch.ones(1, 4, dtype=torch.float64)
    z = torch.zeros(1, 3, dtype=torch.float64)
    f, M0 = layer_objective(net, 0, x, z)
    est = hessian_norm_estimate(f, M0, q, torch.Generator().manual_seed(0))
    exact = {1: 2 * 16.0, 2: 2 * 4.0, math.inf: 2 * 3.0}[q]  # sup 2||Ux||_2^2 / ||U||_q^2
    assert est == pytest.approx(exact, rel=1e-6)
    assert est <= layer_bounds(net, q)[0] ** 2


@pytest.mark.parametrize("q", QS, ids=["q1", "q2", "qinf"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_descent_lemma_every_layer(case, q):
    """F Props. 4.3-4.4: w_i <- w_i - rho_q(g_i) / p_i^2 decreases f by >= ||g_i||_*^2 / (2 p_i^2)."""
    _, widths, acts, scale, D = case
    gen = torch.Generator().manual_seed(7)
    net = make_net(widths, acts, bias=True, scale=2 * scale, seed=3)
    x = D * (2 * torch.rand(16, widths[0], generator=gen, dtype=torch.float64) - 1)
    z = D * torch.sign(torch.randn(16, widths[-1], generator=gen, dtype=torch.float64))
    p = layer_bounds(net, q, data_bound=D)
    for i in range(len(widths) - 1):
        f, M0 = layer_objective(net, i, x, z)
        M = M0.clone().requires_grad_(True)
        G = torch.autograd.grad(f(M), M)[0]
        rho, N = duality_map(G, q)
        assert N == pytest.approx(dual_norm(G, q))
        f0, f1 = f(M0).item(), f(M0 - rho / p[i] ** 2).item()
        assert f1 <= f0 - N * N / (2 * p[i] ** 2) + 1e-12


# ------------------------------------------------------------------------------------------
# Assumption 4.1 violations and other errors
# ------------------------------------------------------------------------------------------


def test_unbounded_modules_rejected():
    with pytest.raises(ValueError, match=r"module 1 \(ReLU\)"):
        layer_bounds(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), 2)
    with pytest.raises(ValueError, match="last.*no bounded activation"):
        layer_bounds(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), 2)
    with pytest.raises(ValueError, match=r"module 2 \(Linear\).*not followed"):
        parse_model(nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="nn.Sequential"):
        layer_bounds(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="activation without a preceding Linear"):
        parse_model(nn.Sequential(nn.Tanh(), nn.Linear(2, 2), nn.Tanh()))
    # nested Sequential, Flatten first and Identity are fine
    net = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.Sigmoid()),
                        nn.Linear(3, 2), nn.Tanh())
    assert [s.index for s in parse_model(net)] == [1, 2]


def test_non_finite_weights_and_bad_arguments():
    net = make_net([2, 3, 2])
    with torch.no_grad():
        net[2].weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match="layer 2 weight.*nan"):
        layer_bounds(net, 2)
    net = make_net([2, 3, 2])
    for bad in (0.0, -1.0, float("inf"), "x"):
        with pytest.raises(ValueError, match="data_bound"):
            layer_bounds(net, 2, data_bound=bad)
    with pytest.raises(ValueError, match="got 3"):
        layer_bounds(net, 3)


def test_check_data():
    x = torch.tensor([[0.5, -2.5]])
    z = torch.tensor([[1.0]])
    with pytest.raises(ValueError, match=r"inputs .*2\.5.*data_bound = 1"):
        check_data(x, z)
    with pytest.raises(ValueError, match=r"targets .*1"):
        check_data(x * 0.1, z * 1.5)
    x2, z2 = check_data(x, z, rescale=True)
    assert x2.abs().max().item() == pytest.approx(1.0) and torch.equal(z2, z)
    assert check_data(x, z, data_bound=3.0)[0] is x
    with pytest.raises(ValueError, match="non-finite"):
        check_data(torch.tensor([float("nan")]))


def test_objective_is_mean_squared_euclidean_error():
    net = make_net([2, 3])
    x = torch.rand(5, 2, dtype=torch.float64)
    z = torch.rand(5, 3, dtype=torch.float64)
    ref = sum(((net(x[j]) - z[j]) ** 2).sum() for j in range(5)) / 5
    assert objective(net, x, z).item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("q", QS, ids=["q1", "q2", "qinf"])
def test_variance_bounds(q):
    """The mixed-width sigma2 is below F Lemma 4.10's for equal widths, and both scale as 1/b."""
    K, n, b = 3, 6, 4
    shapes = [(n, n)] * K
    tight = variance_bound(shapes, q, b)
    paper = variance_bound_paper(K, n, q, b)
    assert tight <= paper
    assert paper == pytest.approx(32 * K * n ** max(1 + 2 / q, 4 - 4 / q) / b)
    assert variance_bound(shapes, q, 2 * b) == pytest.approx(tight / 2)
    net = make_net([5, 4, 3])
    assert variance_bound(net, q, b) == variance_bound([(4, 6), (3, 5)], q, b)
    assert variance_bound(net, q, b, method="paper") == variance_bound_paper(2, 6, q, b)


def test_activation_constants():
    """The Table of sup-norms: grid maxima of |sigma'|, |sigma''| stay below and approach them."""
    t = torch.linspace(-8, 8, 40001, dtype=torch.float64, requires_grad=True)
    for mod, (a, b) in ((nn.Sigmoid(), SIG), (nn.Tanh(), TANH)):
        y = mod(t)
        d1 = torch.autograd.grad(y.sum(), t, create_graph=True)[0]
        d2 = torch.autograd.grad(d1.sum(), t)[0]
        assert y.abs().max() <= 1
        assert d1.abs().max().item() == pytest.approx(a, rel=1e-8)
        assert d2.abs().max().item() == pytest.approx(b, rel=1e-6)
        const = bounds.ACTIVATIONS[type(mod)]
        assert const.d1 == a and const.d2 == pytest.approx(b, rel=1e-15)
