"""The pieces of the local certificate (smoothchain.local, docs/local.md) against brute force;
its soundness on random chains is attacked by tests/test_soundness.py (every case around the
weights is also certified locally, on the same batch the measurements use)."""

from __future__ import annotations

import math
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from smoothchain import ChainError, components  # noqa: E402
from smoothchain.components import ChannelAffine, Conv2d, Linear, ReLU, Sigmoid, Softplus, Tanh  # noqa: E402
from smoothchain.local import _joint_smoothness, certify_local  # noqa: E402
from smoothchain.losses import loss_function  # noqa: E402

DT = torch.float64


def _grid_sups(comp, lo, hi, n=20001):
    t = torch.stack([torch.linspace(a, b, n, dtype=DT) for a, b in zip(lo.tolist(), hi.tolist())]).reshape(-1)
    t.requires_grad_(True)
    y = comp.to_torch().double()(t)
    d1 = torch.autograd.grad(y.sum(), t, create_graph=True)[0]
    d2 = torch.autograd.grad(d1.sum(), t)[0]
    return float(d1.detach().abs().max()), float(d2.detach().abs().max())


@settings(max_examples=40, deadline=None)
@given(comp=st.sampled_from([Tanh(), Sigmoid(), Softplus(1.0), Softplus(3.0)]),
       centres=st.lists(st.floats(-6, 6), min_size=1, max_size=4), width=st.floats(0.0, 3.0))
def test_sup_on_intervals_bounds_and_attains_the_grid(comp, centres, width):
    lo = torch.tensor(centres, dtype=DT) - width
    hi = torch.tensor(centres, dtype=DT) + width
    s1, s2 = comp.sup_on(lo, hi)
    g1, g2 = _grid_sups(comp, lo, hi)
    assert g1 <= s1 * (1 + 1e-9) and g2 <= s2 * (1 + 1e-9)
    assert s1 <= g1 * (1 + 1e-4) + 1e-12 and s2 <= g2 * (1 + 1e-4) + 1e-9  # exact, up to the grid's spacing
    assert s1 <= comp.facts.d1 and s2 <= comp.facts.d2


def test_relu_is_linear_away_from_its_kink():
    assert ReLU().sup_on(torch.tensor([0.5]), torch.tensor([2.0])) == (1.0, 0.0)
    assert ReLU().sup_on(torch.tensor([-2.0]), torch.tensor([-0.5])) == (0.0, 0.0)
    assert ReLU().sup_on(torch.tensor([-0.5]), torch.tensor([0.5]))[1] == math.inf


def test_entry_norms_by_brute_force():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 5, 5, generator=g, dtype=DT)
    W = torch.randn(4, 2, 3, 3, generator=g, dtype=DT)
    conv = Conv2d(2, 4, 3, 2, 1)
    slice_norm, row = conv.entry_norms_at(W, z)
    padded = torch.nn.functional.pad(z, (1, 1, 1, 1))
    best = max(float(padded[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].norm())
               for n in range(3) for i in range(3) for j in range(3))
    assert slice_norm == pytest.approx(best, rel=1e-8)
    assert row == pytest.approx(max(float(W[c].norm()) for c in range(4)), rel=1e-8)
    # every output entry of the conv is at most row x slice (Cauchy-Schwarz)
    out = torch.nn.functional.conv2d(z, W, None, 2, 1)
    assert float(out.abs().max()) <= row * slice_norm
    lin = Linear(5, 3)
    Wl = torch.randn(3, 5, generator=g, dtype=DT)
    zl = torch.randn(4, 5, generator=g, dtype=DT)
    s, r = lin.entry_norms_at(Wl, zl)
    assert s == pytest.approx(float(zl.norm(dim=1).max()), rel=1e-8)
    assert r == pytest.approx(float(Wl.norm(dim=1).max()), rel=1e-8)
    gamma = torch.randn(2, generator=g, dtype=DT)
    assert ChannelAffine(2).entry_norms_at(gamma, z) == pytest.approx(
        (float(z.abs().max()), float(gamma.abs().max())), rel=1e-8)


@settings(max_examples=100, deadline=None)
@given(vals=st.lists(st.floats(0, 10), min_size=9, max_size=9), e=st.floats(0, 1))
def test_joint_smoothness_bounds_the_quadratic_form(vals, e):
    """The 2 x 2 eigenvalue bounds the quadratic form at every unit (|e|, |d|), and with
    v_inf = v, z_inf = z it never exceeds the sum of the terms (RH eq. 21's bound)."""
    s1, s_rest, la, v, z, l_prev, L_prev, Lb, frac = vals
    v_inf, z_inf = v * min(frac / 10, 1), z * min(frac / 10, 1)
    lam = _joint_smoothness(s1, s_rest, la, v, z, v_inf, z_inf, l_prev, L_prev, Lb)
    d = math.sqrt(1 - e * e)
    form = (s1 * (v_inf * e + z_inf * l_prev * d) * (v * e + z * l_prev * d) + s_rest * (v * e + z * l_prev * d) ** 2
            + la * (2 * Lb * l_prev * e * d + z * L_prev * d * d))
    assert form <= lam * (1 + 1e-9) + 1e-9
    eq21 = ((s1 + s_rest) * (v * v + 2 * v * z * l_prev + z * z * l_prev ** 2) + la * (2 * Lb * l_prev + z * L_prev))
    assert _joint_smoothness(s1, s_rest, la, v, z, v, z, l_prev, L_prev, Lb) <= eq21 * (1 + 1e-9) + 1e-9


def test_local_certificate_is_sharper_and_checked():
    """On the built-in mlp's shape: the local L_F is below the tight one at the same input norm,
    and check (estimates on the same batch) finds no violation."""
    from smoothchain import certify
    from smoothchain.check import check

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 6, dtype=DT)
    y = torch.tensor([0, 1, 2, 1])
    local = certify_local(net, x, y, radius=0.1)
    tight = certify(net, input_shape=(6,), batch_size=4, radius=0.1, input_norm=float(x.norm()), mode="tight",
                    around_weights=True)
    assert local.mode == "local" and local.objective.smoothness < tight.objective.smoothness
    res = check(net, input_shape=(6,), batch_size=4, radius=0.1, mode="local", around_weights=True, points=2,
                ascent_steps=2, per_layer=True)
    assert res.violations == ()


def test_entry_norms_of_a_dilated_conv_by_unfold():
    """The patch norms (a convolution of the squares) equal those of the unfolded patches, with
    dilation and in chunks of one example."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 2, 9, 8, generator=g, dtype=DT)
    W = torch.randn(4, 2, 3, 2, generator=g, dtype=DT)
    conv = Conv2d(2, 4, (3, 2), (2, 1), (1, 0), (2, 3))
    patches = torch.nn.functional.unfold(z, (3, 2), (2, 3), (1, 0), (2, 1))
    best = float(patches.norm(dim=1).max())
    for chunk in (components.PATCH_CHUNK_ENTRIES, 1):
        with mock.patch.object(components, "PATCH_CHUNK_ENTRIES", chunk):
            assert conv.entry_norms_at(W, z)[0] == pytest.approx(best, rel=1e-8)


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_adjoints_and_patches_change_no_bound(bias):
    """A certificate computed one example at a time (adjoints and patch matrices) equals the
    one-pass certificate: the chunking is bookkeeping, not a bound."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=bias), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(12, 5, bias=bias), nn.Sigmoid(), nn.Linear(5, 3)).double()
    x = torch.randn(5, 1, 4, 4, dtype=DT)
    y = torch.tensor([0, 1, 2, 1, 0])
    whole = certify_local(net, x, y, radius=0.2)
    with mock.patch.object(components, "PATCH_CHUNK_ENTRIES", 1):
        parts = certify_local(net, x, y, radius=0.2, chunk_size=1)
    assert parts.objective.smoothness == pytest.approx(whole.objective.smoothness, rel=1e-10)
    for a, b in zip(parts.bounds.layers, whole.bounds.layers):
        assert (a.output_bound, a.lipschitz, a.smoothness) == pytest.approx(
            (b.output_bound, b.lipschitz, b.smoothness), rel=1e-10)
    with pytest.raises(ChainError, match="chunk_size"):
        certify_local(net, x, y, chunk_size=0)


def test_local_certificate_errors():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ChainError, match="radius"):
        certify_local(net, torch.zeros(2, 2), torch.tensor([0, 1]), radius=-1.0)
    with pytest.raises(ValueError, match="loss"):
        certify_local(net, torch.zeros(2, 2), torch.tensor([0, 1]), loss="autoencoder")
    with pytest.raises(ChainError, match="NaN"):
        certify_local(net, torch.full((2, 2), math.nan), torch.tensor([0, 1]))


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["linear", "conv"]), bias=st.booleans(), m=st.integers(1, 4), seed=st.integers(0, 10_000),
       stride=st.integers(1, 2), padding=st.integers(0, 1), chunked=st.booleans())
def test_batch_gain_is_the_norm_of_the_weight_map(kind, bias, m, seed, stride, padding, chunked):
    """||e -> beta(e, z) + beta^v(e)|| built densely (the Jacobian of the layer in its weights,
    by autograd) equals Component.batch_gain_at up to its margin (docs/local.md, weight gain);
    ``chunked``: the convolution's patch matrix summed one example at a time (large batches)."""
    torch.manual_seed(seed)
    if kind == "linear":
        layer, z = nn.Linear(5, 3, bias=bias).double(), torch.randn(m, 2, 5, dtype=DT)
        comp = Linear(5, 3, bias)
    else:
        layer = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=bias).double()
        z = torch.randn(m, 2, 5, 5, dtype=DT)
        comp = Conv2d.from_torch(layer, (2, 5, 5))
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach() for _, p in layer.named_parameters())

    def out(*ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (z,)).reshape(-1)

    jac = torch.func.jacrev(out, argnums=tuple(range(len(params))))(*params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)
    exact = float(torch.linalg.matrix_norm(J, 2))
    with mock.patch.object(components, "PATCH_CHUNK_ENTRIES", 1 if chunked else components.PATCH_CHUNK_ENTRIES):
        got = comp.batch_gain_at(z, bias)
    assert exact <= got <= exact * (1 + 1e-7) + 1e-9


@settings(max_examples=20, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=4), act=st.sampled_from(["tanh", "sigmoid", "softplus"]),
       m=st.integers(1, 4), seed=st.integers(0, 10_000), radius=st.sampled_from([0.0, 0.05, 0.3]),
       loss=st.sampled_from(["cross-entropy", "square"]))
def test_objective_bound_holds_at_random_points_of_the_ball(widths, act, m, seed, radius, loss):
    """L_F of certify_local (with the adjoint bound of docs/local.md Prop. 4) is at least the top
    |eigenvalue| of the dense Hessian of F at the weights and at random points of C; and it is
    never above RH Prop. 4.2's composition of the same chain and loss constants."""
    if widths[-1] < 2:
        widths = widths[:-1] + [2]
    torch.manual_seed(seed)
    acts = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}
    mods = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(acts[act]())
    model = nn.Sequential(*mods).double()
    x = torch.randn(m, widths[0], dtype=DT)
    y = torch.randint(0, widths[-1], (m,)) if loss == "cross-entropy" else torch.randn(m, widths[-1], dtype=DT)
    cert = certify_local(model, x, y, loss=loss, radius=radius)
    o, bnd = cert.objective, cert.bounds
    assert o.smoothness <= bnd.smoothness * o.loss_lipschitz + bnd.lipschitz ** 2 * o.loss_smoothness + 1e-12

    layers = [mod for mod in model if isinstance(mod, nn.Linear)]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    f = loss_function(loss, y, x)

    def F(w):
        ps = torch.split(w, [s.numel() for s in shapes])
        return f(torch.func.functional_call(model, {n: p.reshape(s) for n, p, s in zip(names, ps, shapes)}, (x,)))

    gen = torch.Generator().manual_seed(seed)
    for k in range(3):
        w = w0.clone()
        start = 0
        for layer in layers:  # a point of C: each layer's (W, b) moved by at most R
            n = sum(p.numel() for p in layer.parameters())
            d = torch.randn(n, generator=gen, dtype=DT)
            w[start:start + n] += (radius if k else 0.0) * d / d.norm()
            start += n
        H = torch.func.hessian(F)(w)
        top = float(torch.linalg.eigvalsh((H + H.T) / 2).abs().max())
        assert top <= o.smoothness * (1 + 1e-9) + 1e-12, (top, o.smoothness)
