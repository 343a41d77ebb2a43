"""The DSGD optimizer (F Algo. 4.1), the abstract iteration (F Algo. 3.1) and the rates.

* batch DSGD with lr = 1 never increases the training loss (greedy, random, sequential;
  q = 1, 2, inf; two nets) on random bounded data, over ``SMOOTHCHAIN_DSGD_STEPS`` steps
  (default 150) per case, plus a ``SMOOTHCHAIN_DSGD_LONG_STEPS`` (default 2000) greedy run
  per q -- 8700 steps in all;
* F Thm 4.8's guarantee min_t ||df/dw(w(t))||_{w(t)}^2 <= 2 f(w(1)) / T holds on a run;
* every variant runs and ``last_layers`` is right; greedy picks argmax ||g_i||_* / p_i and moves
  by -(1/p_i^2) rho(g_i), both recomputed here independently;
* stochastic mode: step size of F Thm 4.12, and the empirical variance of mini-batch gradients
  in the local dual norm stays below ``variance_bound``;
* toy problems: F Sec. 2's network from a far start, F Example 3.12 (where Euclidean GD with
  the same step diverges), the Euclidean structure = plain GD;
* rates: Thm 3.9 / Cor. 3.10 / Cor. 3.11 / Thm 4.12 consistency, including the printed
  Cor. 3.10 (2) / Thm 4.12 bounds that Thm 3.9 does not imply;
* bad hyper-parameters raise ValueError with the value.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from smoothchain.dsgd import layer_bounds, objective, rates  # noqa: E402
from smoothchain.dsgd.structure import Euclidean, check_duality, dsgd, example_312  # noqa: E402
from smoothchain.optim import DSGD  # noqa: E402

QS = [1, 2, math.inf]
QIDS = ["q1", "q2", "qinf"]
STEPS = int(os.environ.get("SMOOTHCHAIN_DSGD_STEPS", "150"))
LONG_STEPS = int(os.environ.get("SMOOTHCHAIN_DSGD_LONG_STEPS", "2000"))


def make_net(widths, acts=None, bias=True, scale=1.0, seed=0):
    torch.manual_seed(seed)
    acts = acts or [nn.Sigmoid] * (len(widths) - 1)
    mods = []
    for a, b, act in zip(widths, widths[1:], acts):
        lin = nn.Linear(a, b, bias=bias)
        with torch.no_grad():
            lin.weight.normal_(0.0, scale / math.sqrt(a))
        mods += [lin, act()]
    return nn.Sequential(*mods).double()


def make_data(widths, m=32, seed=0, D=1.0):
    g = torch.Generator().manual_seed(seed)
    x = D * (2 * torch.rand(m, widths[0], generator=g, dtype=torch.float64) - 1)
    z = D * torch.sign(torch.randn(m, widths[-1], generator=g, dtype=torch.float64))
    return x, z


def closure_for(opt, net, x, z):
    def closure():
        opt.zero_grad()
        loss = objective(net, x, z)
        loss.backward()
        return loss

    return closure


def run(net, x, z, steps, **kw):
    opt = DSGD(net, **kw)
    closure = closure_for(opt, net, x, z)
    losses, chosen = [], []
    for _ in range(steps):
        losses.append(opt.step(closure).item())
        chosen.append(opt.last_layers)
    losses.append(objective(net, x, z).item())
    return opt, losses, chosen


NETS = {
    "sig-4-6-3": ([4, 6, 3], None),
    "tanh-sig-5-3-4-2": ([5, 3, 4, 2], [nn.Tanh, nn.Tanh, nn.Sigmoid]),
}


# ------------------------------------------------------------------------------------------
# Monotone decrease and Thm 4.8
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["greedy", "random", "sequential"])
@pytest.mark.parametrize("q", QS, ids=QIDS)
@pytest.mark.parametrize("net_id", list(NETS))
def test_batch_dsgd_never_increases_loss(net_id, q, variant):
    widths, acts = NETS[net_id]
    net = make_net(widths, acts, scale=2.0, seed=1)
    x, z = make_data(widths, seed=2)
    _, losses, _ = run(net, x, z, STEPS, q=q, variant=variant, seed=0)
    inc = [b - a for a, b in zip(losses, losses[1:])]
    assert max(inc) <= 1e-12 * losses[0], max(inc)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("q", QS, ids=QIDS)
def test_batch_dsgd_never_increases_loss_long(q):
    """LONG_STEPS (default 2000) greedy steps per q on random bounded data, mixed activations
    and widths, biases: the loss never increases and keeps decreasing (~1 s per q)."""
    widths, acts = NETS["tanh-sig-5-3-4-2"]
    net = make_net(widths, acts, scale=3.0, seed=4)
    x, z = make_data(widths, m=64, seed=5)
    opt, losses, chosen = run(net, x, z, LONG_STEPS, q=q)
    assert len(losses) == LONG_STEPS + 1
    assert max(b - a for a, b in zip(losses, losses[1:])) <= 1e-12 * losses[0]
    assert losses[-1] < losses[LONG_STEPS // 2] < losses[0]
    assert len({c[0] for c in chosen}) > 1  # the greedy rule switched layers


@pytest.mark.parametrize("q", QS, ids=QIDS)
def test_theorem_48_stationarity_bound(q):
    """min_{t <= T} ||df/dw(w(t))||_{w(t)}^2 <= 2 f(w(1)) / T, the local dual norm being
    max_i ||g_i||_* / p_i(w) (F eq. 32), read from the optimizer's record."""
    widths, acts = NETS["sig-4-6-3"]
    net = make_net(widths, acts, scale=2.0, seed=3)
    x, z = make_data(widths, seed=3)
    opt = DSGD(net, q=q)
    closure = closure_for(opt, net, x, z)
    f1, local = None, []
    for _ in range(STEPS):
        loss = opt.step(closure).item()
        f1 = loss if f1 is None else f1
        local.append(max(d / p for d, p in zip(opt.last_dual_norms, opt.last_p) if d is not None) ** 2)
    for T in (1, 10, STEPS):
        assert min(local[:T]) <= 2 * f1 / T
    delta = 2 * f1 / (STEPS - 0.5)
    T = rates.batch_iterations(f1, delta)  # ceil(2 f(w(1)) / delta)
    assert T == STEPS and min(local[:T]) <= delta


# ------------------------------------------------------------------------------------------
# Variants, last_layers, the greedy rule and the update, recomputed independently
# ------------------------------------------------------------------------------------------


def _ref_dual_and_rho(G: np.ndarray, q):
    if q == 1:
        idx = np.abs(G).argmax(axis=0)
        N = np.abs(G).max(axis=0).sum()
        m = np.zeros_like(G)
        cols = np.arange(G.shape[1])
        m[idx, cols] = np.where(G[idx, cols] >= 0, 1.0, -1.0)
        return N, N * m
    if q == math.inf:
        N, rhoT = _ref_dual_and_rho(G.T, 1)
        return N, rhoT.T
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    return S.sum(), S.sum() * U @ Vt


def _matrices(net, grad=False):
    out = []
    for m in net:
        if isinstance(m, nn.Linear):
            W = m.weight.grad if grad else m.weight
            b = m.bias.grad if grad else m.bias
            out.append(torch.cat([W, b[:, None]], 1).detach().numpy().copy())
    return out


@pytest.mark.parametrize("q", QS, ids=QIDS)
@pytest.mark.parametrize("variant", ["greedy", "all"])
def test_greedy_and_all_updates_match_algorithm_41(q, variant):
    widths, acts = NETS["tanh-sig-5-3-4-2"]
    net = make_net(widths, acts, scale=2.0, seed=6)
    x, z = make_data(widths, seed=6)
    opt = DSGD(net, q=q, variant=variant, lr=0.7, norm_refresh=1)  # exact p_i each step
    for _ in range(8):
        opt.zero_grad()
        objective(net, x, z).backward()
        before = _matrices(net)
        grads = _matrices(net, grad=True)
        p = layer_bounds(net, q)
        refs = [_ref_dual_and_rho(G, q) for G in grads]
        opt.step()
        after = _matrices(net)
        if variant == "greedy":
            ratios = [N / pi for (N, _), pi in zip(refs, p)]
            expected_layers = [int(np.argmax(ratios)) + 1]
        else:
            expected_layers = [1, 2, 3]
        assert opt.last_layers == expected_layers
        assert opt.last_p == pytest.approx(p, rel=1e-12)
        for i in range(3):
            step = np.zeros_like(before[i])
            if i + 1 in expected_layers:
                step = -0.7 / p[i] ** 2 * refs[i][1]
            np.testing.assert_allclose(after[i] - before[i], step, rtol=1e-7, atol=1e-12)


def test_sequential_and_random_variants():
    widths, acts = NETS["tanh-sig-5-3-4-2"]
    x, z = make_data(widths, seed=7)
    _, _, chosen = run(make_net(widths, acts, seed=7), x, z, 7, q=2, variant="sequential")
    assert chosen == [[1], [2], [3], [1], [2], [3], [1]]
    _, _, c1 = run(make_net(widths, acts, seed=7), x, z, 40, q=1, variant="random", seed=11)
    _, _, c2 = run(make_net(widths, acts, seed=7), x, z, 40, q=1, variant="random", seed=11)
    assert c1 == c2 and all(len(c) == 1 for c in c1)
    assert {c[0] for c in c1} == {1, 2, 3}
    opt, _, chosen = run(make_net(widths, acts, seed=7), x, z, 3, q=math.inf, variant="all")
    assert chosen == [[1, 2, 3]] * 3
    assert opt.state_dict()["state"]  # the step counter travels with state_dict


def test_step_without_closure_and_bound_scaling_off():
    widths, acts = NETS["sig-4-6-3"]
    net = make_net(widths, acts, seed=8)
    x, z = make_data(widths, seed=8)
    opt = DSGD(net, q=1, variant="sequential", lr=0.1, bound_scaling=False)
    objective(net, x, z).backward()
    before = _matrices(net)
    G = _matrices(net, grad=True)[0]
    assert opt.step() is None and opt.last_layers == [1]
    np.testing.assert_allclose(_matrices(net)[0] - before[0], -0.1 * _ref_dual_and_rho(G, 1)[1],
                               rtol=1e-9, atol=1e-14)


def test_float32_model_and_flatten():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.Sigmoid())
    x = torch.rand(16, 2, 3)
    z = torch.rand(16, 3)
    opt = DSGD(net, q=2)
    closure = closure_for(opt, net, x, z)
    losses = [opt.step(closure).item() for _ in range(20)]
    assert net[1].weight.dtype == torch.float32
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------
# Stochastic mode
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", QS, ids=QIDS)
def test_minibatch_variance_below_bound(q):
    """E ||g_B - g||_w^2 (dual norm (32) at w) over random mini-batches <= variance_bound."""
    widths, acts = NETS["sig-4-6-3"]
    net = make_net(widths, acts, scale=2.0, seed=9)
    x, z = make_data(widths, m=64, seed=9)
    b = 4
    p = layer_bounds(net, q)

    def grads(idx):
        net.zero_grad()
        objective(net, x[idx], z[idx]).backward()
        return _matrices(net, grad=True)

    full = grads(torch.arange(64))
    g = torch.Generator().manual_seed(0)
    vals = []
    for _ in range(60):
        gb = grads(torch.randint(64, (b,), generator=g))
        vals.append(max(_ref_dual_and_rho(B - F, q)[0] / pi for B, F, pi in zip(gb, full, p)) ** 2)
    assert np.mean(vals) <= rates.variance_bound(net, q, b)


def test_stochastic_mode_step_size():
    widths, acts = NETS["sig-4-6-3"]
    net = make_net(widths, acts, seed=10)
    s2 = rates.variance_bound(net, 2, 8)
    opt = DSGD(net, q=2, mode="stochastic", gamma=3 * s2, batch_size=8)
    assert opt.sigma2 == pytest.approx(s2)
    assert opt.theory_step == pytest.approx(0.25 * (3 * s2 - s2) / (3 * s2 + s2)) == 0.125
    x, z = make_data(widths, m=64, seed=10)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        idx = torch.randint(64, (8,), generator=g)
        opt.step(closure_for(opt, net, x[idx], z[idx]))
    opt2 = DSGD(net, q=2, mode="stochastic", gamma=2.0, sigma2=1.0)
    assert opt2.theory_step == pytest.approx(rates.stochastic_step_size(2.0, 1.0))


# ------------------------------------------------------------------------------------------
# Toy problems
# ------------------------------------------------------------------------------------------


def test_flynn_section2_network_from_far_start():
    """F eq. (2): E(w) = sigma(w3 sigma(w1) + w4 sigma(w2))^2 (input 1, target 0), whose
    Hessian is unbounded (F Prop. 2.1).  DSGD (lr = 1) decreases it monotonically."""
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Sigmoid(),
                        nn.Linear(2, 1, bias=False), nn.Sigmoid()).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        net[2].weight.copy_(torch.tensor([[40.0, -38.0]]))
    x = torch.ones(1, 1, dtype=torch.float64)
    z = torch.zeros(1, 1, dtype=torch.float64)
    for q in QS:
        n = copy.deepcopy(net)
        _, losses, _ = run(n, x, z, 100, q=q)
        assert all(b <= a + 1e-15 for a, b in zip(losses, losses[1:]))
        assert losses[-1] < 0.05 * losses[0]


def test_example_312_dsgd_versus_gradient_descent():
    f, grad, structure = example_312()
    w0 = np.array([3.0, -2.0])
    res = dsgd(grad, w0, structure, step_size=1.0, num_steps=300, f=f, gamma=1e-6)
    assert np.all(np.diff(res.values) <= 1e-12) and res.values[-1] < 1e-3
    assert res.tau is not None
    gd = dsgd(grad, w0, Euclidean(), step_size=1.0, num_steps=5, f=f)
    assert gd.values[-1] > 100 * gd.values[0]  # the Euclidean step 1 blows up here
    # F Assumption 3.5 with L = 1 along duality-map rays, at random points
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.normal(0, 4, 2)
        eta = rng.normal(0, 4, 2)
        eps = rng.uniform(-2, 2)
        r = structure.duality_map(w, eta)
        lhs = abs(f(w + eps * r) - f(w) - eps * grad(w) @ r)
        assert lhs <= 0.5 * eps**2 * structure.dual_norm(w, eta) ** 2 + 1e-9
        assert max(check_duality(structure, w, eta)) < 1e-12


def test_euclidean_structure_is_gradient_descent():
    A = np.diag([1.0, 3.0])

    def grad(w, t):  # two-argument form: the estimate may depend on t
        return A @ w

    res = dsgd(grad, [1.0, 1.0], Euclidean(), step_size=lambda t: 0.25, num_steps=3)
    w = np.array([1.0, 1.0])
    for _ in range(3):
        w = w - 0.25 * A @ w
    np.testing.assert_allclose(res.w, w)


# ------------------------------------------------------------------------------------------
# Rates
# ------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(G=st.floats(0, 100), L=st.floats(0.1, 10), c=st.floats(0, 1), s2=st.floats(0, 10),
       extra=st.floats(0.01, 100))
def test_theorem_39_and_corollary_310(G, L, c, s2, extra):
    """Thm 3.9 at Cor. 3.10's step stays below our (corrected) closed form."""
    gamma = (1 - c) / (1 + c) * s2 + extra
    eps = rates.corollary_310_step_size(L, c, s2, gamma)
    assert eps == pytest.approx(0.5 * rates.max_step_size(L, c, s2, gamma))
    bound39 = rates.stopping_time_bound(G, L, c, s2, gamma, eps)
    assert 1 <= bound39 * (1 + 1e-12) and bound39 <= rates.corollary_310_bound(G, L, c, s2, gamma) * (1 + 1e-9)


@settings(deadline=None, max_examples=30)
@given(G=st.floats(0, 100), L=st.floats(0.25, 10), s2=st.floats(0, 10), gamma=st.floats(0.01, 100))
def test_corollary_310_case1_as_printed_holds_for_L_above_quarter(G, L, s2, gamma):
    eps = rates.corollary_310_step_size(L, 1.0, s2, gamma)
    assert eps == pytest.approx(gamma / (L * (gamma + s2)))
    assert rates.stopping_time_bound(G, L, 1.0, s2, gamma, eps) <= rates.corollary_310_bound_paper(
        G, L, 1.0, s2, gamma) * (1 + 1e-9)


def test_printed_corollary_310_and_theorem_412_can_fail():
    """F's printed Cor. 3.10 (2) / Thm 4.12 bounds are not implied by Thm 3.9 (c = 0, noise):
    see docs/dsgd.md section 7; ours are."""
    G, s2, gamma = 100.0, 1.0, 2.0
    eps = rates.stochastic_step_size(gamma, s2)
    exact = rates.stopping_time_bound(G, 1.0, 0.0, s2, gamma, eps)
    assert rates.stochastic_stopping_time_bound_paper(G, gamma, s2) < exact
    assert exact <= rates.stochastic_stopping_time_bound(G, gamma, s2)
    assert rates.stochastic_stopping_time_bound(G, gamma, s2) == pytest.approx(
        16 * G * (gamma + s2) / (gamma - s2) ** 2 + 2 * gamma / (gamma - s2))


@settings(deadline=None, max_examples=30)
@given(G=st.floats(0, 100), s2=st.floats(0, 10), extra=st.floats(0.01, 100))
def test_theorem_412_is_corollary_310_with_L1_c0(G, s2, extra):
    gamma = s2 + extra
    assert rates.stochastic_step_size(gamma, s2) == pytest.approx(
        rates.corollary_310_step_size(1.0, 0.0, s2, gamma))
    assert rates.stochastic_stopping_time_bound(G, gamma, s2) == pytest.approx(
        rates.corollary_310_bound(G, 1.0, 0.0, s2, gamma))
    assert rates.stochastic_stopping_time_bound_paper(G, gamma, s2) == pytest.approx(
        rates.corollary_310_bound_paper(G, 1.0, 0.0, s2, gamma))


def test_corollary_310_case1_and_311():
    G, L, s2, gamma = 3.0, 2.0, 0.5, 0.7
    assert rates.corollary_310_bound_paper(G, L, 1.0, s2, gamma) == pytest.approx(
        2 * G * L * s2 / gamma**2 + 4 * L * (G + s2) / gamma + 8 * L)
    assert rates.corollary_311_iterations(G, L, 0.5) == math.ceil(2 * G * L / 0.5)
    assert rates.corollary_311_stationarity(G, L, 24) == pytest.approx(2 * G * L / 24)
    assert rates.batch_step_size() == 1.0 and rates.batch_iterations(2.0, 0.1) == 40


def test_rates_errors():
    with pytest.raises(ValueError, match="gamma > sigma2 = 2.0, got gamma = 1.0"):
        rates.stochastic_step_size(1.0, 2.0)
    with pytest.raises(ValueError, match="eps < "):
        rates.stopping_time_bound(1.0, 1.0, 0.0, 0.0, 1.0, 0.6)
    with pytest.raises(ValueError, match="1.5"):
        rates.max_step_size(1.0, 1.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="batch_size.*0"):
        rates.variance_bound([(2, 2)], 2, 0)


# ------------------------------------------------------------------------------------------
# Bad hyper-parameters
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"q": 3}, "got 3"),
    ({"q": "two"}, "'two'"),
    ({"variant": "best"}, "'best'"),
    ({"lr": 0.0}, "got 0.0"),
    ({"lr": -1.0}, "got -1.0"),
    ({"lr": float("nan")}, "got nan"),
    ({"data_bound": 0.0}, "got 0.0"),
    ({"mode": "online"}, "'online'"),
    ({"method": "qr"}, "'qr'"),
    ({"gamma": 1.0}, "gamma=1.0 with mode='batch'"),
    ({"mode": "stochastic", "gamma": 1.0, "sigma2": 2.0}, "got gamma = 1.0"),
    ({"mode": "stochastic", "gamma": 1.0}, "batch_size"),
    ({"mode": "stochastic", "gamma": 1e9, "batch_size": 0}, "got 0"),
    ({"sigma2": 1.0}, "sigma2=1.0"),
    ({"bound_scaling": False}, "greedy"),
])
def test_bad_hyper_parameters(kwargs, match):
    net = make_net([2, 3, 1])
    with pytest.raises(ValueError, match=match):
        DSGD(net, **kwargs)


def test_bad_models_and_lr_changed_later():
    with pytest.raises(ValueError, match="ReLU"):
        DSGD(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="no bounded activation"):
        DSGD(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)))
    net = make_net([2, 3, 1])
    opt = DSGD(net)
    opt.param_groups[0]["lr"] = -0.5
    with pytest.raises(ValueError, match="-0.5"):
        opt.step()
    with pytest.raises(ValueError, match="inputs"):
        opt.check_data(torch.full((1, 2), 2.0), torch.zeros(1, 1))


# ------------------------------------------------------------------------------------------
# State: weight-norm bounds, checkpoints, the functional step
# ------------------------------------------------------------------------------------------


def _grad_step(opt, net, x, z):
    opt.zero_grad()
    objective(net, x, z).backward()
    opt.step()


@pytest.mark.parametrize("q", QS, ids=QIDS)
@pytest.mark.parametrize("change", ["weight-mul", "bias-add", "load-state-dict", "none"])
def test_weights_changed_outside_the_optimizer_give_a_fresh_step(q, change):
    """The incremental weight-norm bounds hold only for the values the optimizer itself wrote:
    after every layer is changed elsewhere between steps, the next step (p_i, choice, update) is
    exactly that of a fresh optimizer on the same weights.  Without a change the increments are
    in use (p_i differ from a fresh optimizer's), so the comparison is not vacuous."""
    widths, acts = NETS["tanh-sig-5-3-4-2"]
    net = make_net(widths, acts, scale=2.0, seed=12)
    x, z = make_data(widths, m=8, seed=12)  # batch < widths: q = 2 also takes the factored route
    opt = DSGD(net, q=q, variant="all", lr=0.5, norm_refresh=1000)
    for _ in range(4):
        _grad_step(opt, net, x, z)
    lins = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        if change == "weight-mul":
            for lin in lins:
                lin.weight.mul_(2.0)
        elif change == "bias-add":
            for lin in lins:
                lin.bias.add_(0.25)
        elif change == "load-state-dict":
            net.load_state_dict(make_net(widths, acts, scale=2.0, seed=13).state_dict())
    fresh_net = copy.deepcopy(net)
    fresh = DSGD(fresh_net, q=q, variant="all", lr=0.5, norm_refresh=1000)
    _grad_step(opt, net, x, z)
    _grad_step(fresh, fresh_net, x, z)
    if change == "none":
        assert opt.last_p != fresh.last_p and all(a >= b for a, b in zip(opt.last_p, fresh.last_p))
        return
    assert opt.last_p == fresh.last_p
    assert opt.last_layers == fresh.last_layers and opt.last_certified == fresh.last_certified
    for a, b in zip(net.parameters(), fresh_net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("q", QS, ids=QIDS)
def test_one_layer_changed_outside_the_optimizer_gets_an_exact_norm(q):
    """Changing one layer's weight in place invalidates that layer's norm bound only: it is
    recomputed from scratch, while the unchanged layer keeps its (valid) incremental bound."""
    from smoothchain.optim.dsgd import weight_norm_bound

    widths, acts = NETS["tanh-sig-5-3-4-2"]
    net = make_net(widths, acts, scale=2.0, seed=16)
    x, z = make_data(widths, m=8, seed=16)
    opt = DSGD(net, q=q, variant="all", lr=0.5, norm_refresh=1000)
    for _ in range(4):
        _grad_step(opt, net, x, z)
    lins = [m for m in net if isinstance(m, nn.Linear)]
    incremental = [opt._norm_bound(i) for i in (1, 2)]
    exact = [weight_norm_bound(lin.weight, lin.bias, float(q)) for lin in lins[1:]]
    assert all(a > b for a, b in zip(incremental, exact))  # the increments are in use
    with torch.no_grad():
        lins[1].weight.mul_(2.0)
    assert opt._norm_bound(1) == weight_norm_bound(lins[1].weight, lins[1].bias, float(q))
    assert opt._norm_bound(2) == incremental[1]
    with torch.no_grad():
        lins[2].bias[0] += 1.0
    assert opt._norm_bound(2) == weight_norm_bound(lins[2].weight, lins[2].bias, float(q))


@pytest.mark.parametrize("q", QS, ids=QIDS)
@pytest.mark.parametrize("variant", ["random", "greedy"])
def test_state_dict_round_trip_continues_bit_identically(q, variant):
    """model + optimizer state_dict (norm bounds, step counter, the "random" generator) restored
    into a new optimizer built with another seed: the continuation equals an uninterrupted run."""
    import io

    widths, acts = NETS["tanh-sig-5-3-4-2"]
    x, z = make_data(widths, m=16, seed=14)

    def steps(opt, net, n):
        out = []
        for _ in range(n):
            _grad_step(opt, net, x, z)
            out.append((opt.last_layers, opt.last_p))
        return out

    net = make_net(widths, acts, scale=2.0, seed=14)
    opt = DSGD(net, q=q, variant=variant, seed=21, norm_refresh=5)
    steps(opt, net, 7)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    ref = steps(opt, net, 9)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    net2 = make_net(widths, acts, scale=2.0, seed=99)
    net2.load_state_dict(ck["model"])
    opt2 = DSGD(net2, q=q, variant=variant, seed=0, norm_refresh=5)
    opt2.load_state_dict(ck["opt"])
    assert steps(opt2, net2, 9) == ref
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["dsgd"]["generator"], opt2.state_dict()["dsgd"]["generator"])


@pytest.mark.parametrize("q", QS, ids=QIDS)
def test_functional_update_is_the_optimizer_step(q):
    """``dsgd_update`` on plain tensors (copies of the weights and gradients) with the optimizer's
    p_i moves them exactly as ``DSGD.step`` moves the parameters."""
    from smoothchain.optim.dsgd import dsgd_update

    widths, acts = NETS["tanh-sig-5-3-4-2"]
    net = make_net(widths, acts, scale=2.0, seed=15)
    x, z = make_data(widths, seed=15)
    opt = DSGD(net, q=q, lr=0.8, capture="none")
    lins = [m for m in net if isinstance(m, nn.Linear)]
    opt.zero_grad()
    objective(net, x, z).backward()
    p = opt.layer_bounds()
    W = [m.weight.detach().clone() for m in lins]
    b = [m.bias.detach().clone() for m in lins]
    res = dsgd_update(W, b, [m.weight.grad.clone() for m in lins], [m.bias.grad.clone() for m in lins],
                      p, [0.8] * 3, q=q)
    opt.step()
    assert [i + 1 for i in res.layers] == opt.last_layers and res.certified == opt.last_certified
    assert res.dual_norms == opt.last_dual_norms and set(res.step_norms) == set(res.layers)
    for m, w, bb in zip(lins, W, b):
        assert torch.equal(m.weight.detach(), w) and torch.equal(m.bias.detach(), bb)


# ---------------------------------------------------------------------------- q = 2 screening
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.sampled_from([1e-30, 1e-20, 1e-3, 1.0, 1e15]),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**31 - 1))
def test_row_norm_bounds_are_upper_bounds(rows, cols, scale, dtype, seed):
    """The screen's row-norm bounds, computed in the layer's dtype, never fall below the exact
    norms (float64 of the scaled rows, so underflow in float32 squares cannot hide)."""
    from smoothchain.optim.dsgd import _row_norm_bounds

    g = torch.Generator().manual_seed(seed)
    M64 = torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale
    M = M64.to(dtype)
    exact = (M.to(torch.float64) / scale).norm(dim=1) * scale  # the rows as stored, exactly
    bound = _row_norm_bounds(M)
    assert bound.dtype == torch.float64
    assert bool((bound >= exact).all())
    assert bool((bound <= exact * (1 + 1e-3) + 1e-17).all())  # and not loose


def test_q2_hooks_record_only_layers_whose_factors_can_serve():
    """A small layer (min(r, c) <= 64) is not hooked, and a large one whose batch reaches
    min(r, c) is not recorded: their dense cores are as small as the factored ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 80), nn.Sigmoid(), nn.Linear(80, 3), nn.Sigmoid())
    opt = DSGD(net, q=2)
    assert len(opt._hooks) == 2  # the large layer's forward hook and gradient watch
    (net(torch.rand(90, 100)) - 0.5).pow(2).sum(1).mean().backward()  # 90 >= min(80, 101)
    assert [len(r) for r in opt._records] == [0, 0]
    opt.zero_grad()
    x = torch.rand(8, 100)
    (net(x) - 0.5).pow(2).sum(1).mean().backward()
    assert [len(r) for r in opt._records] == [1, 0]
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
