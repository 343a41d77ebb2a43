"""The segment certificate (smoothchain.segment) against autograd.

Along a direction d the module bounds phi(t) = F(w - t d), F(w) = f(psi(w; x)) + l2/2 ||w||^2,
piecewise on [0, T]: every piece (a_j, b_j, S_j) claims S_j >= sup_[a_j, b_j] phi''(t), and the
guaranteed decrease F(w) - F(w - T d) >= -T phi'(0) - sum_j S_j int_{a_j}^{b_j} (T - t) dt is
sound only if every claim is.  What is tested, on random MLPs (hypothesis) and a small CNN:

* ``slope`` and ``curvature_at_start`` equal phi'(0) = -<grad F(w), d> and phi''(0) = d^T H d
  (gradient and Hessian-vector product by double backward);
* every S_j is at least phi''(t) sampled on its piece (both ends, a grid and random points);
* the guaranteed decrease is below the actual decrease F(w) - F(w - T d), also for the step
  ``certified_segment_step`` chooses itself along the gradient (where it must be > 0);
* a segment that carries a softplus pre-activation past float64's exp overflow (beta z > 709)
  still gets finite, sound pieces (a regression case random draws reach only rarely);
* the calls leave the weights (and the inputs) bit-identical, float32 models included;
* the bound tends to phi''(0) as T -> 0 (it is not trivially huge);
* unsupported models, losses and malformed inputs raise ``SegmentError``.

The independent reference: F is rebuilt here from ``torch.func.functional_call`` on the flat
parameter vector (``named_parameters`` order) with ``torch.nn.functional.cross_entropy`` (mean) or
(1/2m) sum ||psi_i - y_i||^2, in float64; phi'' (t) is the second derivative of the scalar map
t -> F(w - t d) by autograd (``torch.func.grad`` twice, vmapped over t), with softplus evaluated
as -logsigmoid(-beta z) / beta (the same function, without overflow).  No expected value is taken
from the module.
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from smoothchain.segment import SegmentError, certified_segment_step, segment_bound  # noqa: E402

DT = torch.float64
RTOL = 1e-9  # float64 rounding only
ATOL = 1e-12

# ----------------------------------------------------------------------------------------------
# the independent reference


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(DT) for _, p in model.named_parameters()])


class _ExactSoftplus(nn.Module):
    """softplus(z) = log(1 + exp(beta z)) / beta = -logsigmoid(-beta z) / beta without overflow
    (torch's Softplus with threshold 1e9 computes exp(beta z): inf / NaN derivatives once
    beta z > ~709, which far steps reach; logaddexp's double backward is NaN for beta z < ~-300);
    mathematically the same function, so the reference is the objective the module certifies."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)

    def forward(self, z):
        return -torch.nn.functional.logsigmoid(-self.beta * z) / self.beta


def _exact_activations(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Softplus):
            assert child.threshold >= 1e6, "the tests only build softplus with an inactive threshold"
            setattr(module, name, _ExactSoftplus(child.beta))
        else:
            _exact_activations(child)


def _objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, l2: float):
    """F as a function of the flat float64 parameter vector (named_parameters order)."""
    ref = copy.deepcopy(model).double()
    _exact_activations(ref)
    names = [n for n, _ in ref.named_parameters()]
    shapes = [p.shape for _, p in ref.named_parameters()]
    sizes = [p.numel() for _, p in ref.named_parameters()]
    x = x.to(DT)
    m = x.shape[0]
    if loss == "square":
        y = y.to(DT)

    def F(w: torch.Tensor) -> torch.Tensor:
        params = {n: c.reshape(s) for n, c, s in zip(names, torch.split(w, sizes), shapes)}
        out = functional_call(ref, params, (x,))
        if loss == "cross-entropy":
            f = torch.nn.functional.cross_entropy(out, y)
        elif loss == "square":
            f = 0.5 * ((out - y) ** 2).sum() / m
        else:  # pragma: no cover - the tests only use the two
            raise AssertionError(loss)
        return f + 0.5 * l2 * (w * w).sum()

    return F


def _grad_and_curvature(F, w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, float]:
    """grad F(w) and d^T Hess F(w) d by double backward."""
    w = w.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(F(w), w, create_graph=True)[0]
    hv = torch.autograd.grad((g * d).sum(), w)[0]
    return g.detach(), float((hv * d).sum())


def _phi_second(F, w: torch.Tensor, d: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """phi''(t) for phi(t) = F(w - t d), at every t of ``ts`` (autograd in t)."""
    def phi(t):
        return F(w - t * d)

    return vmap(grad(grad(phi)))(ts.to(DT))


def _value(F, w: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F(w))


# ----------------------------------------------------------------------------------------------
# models and cases


def _activation(name: str) -> nn.Module:
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    beta = float(name.split(":")[1])
    return nn.Softplus(beta=beta, threshold=1e9)


def _mlp(seed: int, in_dim: int, widths: list[int], out_dim: int, acts: list[str], bias: bool,
         scale: float) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    dims = [in_dim, *widths, out_dim]
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1], bias=bias).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=DT) * scale / math.sqrt(dims[i]))
            if bias:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=DT) * scale * 0.5)
        layers.append(lin)
        if i < len(widths):
            layers.append(_activation(acts[i]))
    return nn.Sequential(*layers)


def _cnn(seed: int, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, kernel_size=3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 2 * 2, classes)).double()


def _batch(seed: int, m: int, in_shape: tuple[int, ...], out_dim: int, loss: str):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((m, *in_shape), generator=g, dtype=DT)
    if loss == "cross-entropy":
        y = torch.randint(0, out_dim, (m,), generator=g)
    else:
        y = torch.randn((m, out_dim), generator=g, dtype=DT)
    return x, y


def _direction(kind: str, F, w: torch.Tensor, seed: int) -> torch.Tensor:
    if kind == "gradient":
        return _grad_and_curvature(F, w, torch.zeros_like(w))[0]
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randn(w.shape, generator=g, dtype=DT)


ACTS = ["tanh", "sigmoid", "softplus:0.5", "softplus:1", "softplus:3"]


@st.composite
def mlp_cases(draw):
    depth = draw(st.integers(1, 3))
    case = dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        in_dim=draw(st.integers(1, 6)),
        widths=[draw(st.integers(1, 12)) for _ in range(depth)],
        out_dim=draw(st.integers(2, 5)),
        acts=[draw(st.sampled_from(ACTS)) for _ in range(depth)],
        bias=draw(st.booleans()),
        scale=draw(st.floats(0.3, 3.0)),
        m=draw(st.integers(1, 8)),
        loss=draw(st.sampled_from(["cross-entropy", "square"])),
        l2=draw(st.sampled_from([0.0, 0.1])),
        direction=draw(st.sampled_from(["gradient", "random"])),
        step=10 ** draw(st.floats(-3.0, 1.0)),
        pieces=draw(st.sampled_from([1, 3, 8])),
    )
    return case


def _build(case: dict):
    model = _mlp(case["seed"], case["in_dim"], case["widths"], case["out_dim"], case["acts"], case["bias"],
                 case["scale"])
    x, y = _batch(case["seed"], case["m"], (case["in_dim"],), case["out_dim"], case["loss"])
    F = _objective(model, x, y, case["loss"], case["l2"])
    w = _flat_params(model)
    d = _direction(case["direction"], F, w, case["seed"])
    return model, x, y, F, w, d


# ----------------------------------------------------------------------------------------------
# the checks every result must pass


def _close(got: float, want: float, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return abs(got - want) <= rtol * abs(want) + atol


def _check_structure(b, step: float | None = None) -> None:
    """pieces contiguous from 0 to T, S_j finite, curvature_bound = max S_j, and the reported
    guaranteed decrease is the formula evaluated on the pieces."""
    T = b.step
    assert math.isfinite(T) and T > 0, b
    if step is not None:
        assert T == step, (T, step)
    assert len(b.pieces) >= 1
    assert b.pieces[0][0] == 0.0, b.pieces
    assert math.isclose(b.pieces[-1][1], T, rel_tol=1e-12), (b.pieces[-1], T)
    for (a0, b0, _), (a1, _, _) in zip(b.pieces, b.pieces[1:]):
        assert b0 == a1, ("pieces not contiguous", b.pieces)
    for a, bb, S in b.pieces:
        assert a < bb, ("empty or reversed piece", (a, bb, S))
        assert math.isfinite(S), ("non-finite curvature bound on a smooth chain", (a, bb, S))
    assert b.curvature_bound == max(S for _, _, S in b.pieces), (b.curvature_bound, b.pieces)
    terms = [S * ((T - a) ** 2 - (T - bb) ** 2) / 2 for a, bb, S in b.pieces]
    want = -T * b.slope - sum(terms)
    scale = abs(T * b.slope) + sum(abs(t) for t in terms)
    assert abs(b.guaranteed_decrease - want) <= 1e-9 * scale + 1e-300, (b.guaranteed_decrease, want)


def _sample_points(pieces, seed: int, per_piece: int = 9, random_per_piece: int = 3):
    """For every piece: a grid of ``per_piece`` points including both ends, and random points."""
    g = torch.Generator().manual_seed(seed + 3)
    ts, owner = [], []
    for j, (a, b, _) in enumerate(pieces):
        pts = torch.linspace(a, b, per_piece, dtype=DT)
        pts = torch.cat([pts, a + (b - a) * torch.rand(random_per_piece, generator=g, dtype=DT)])
        pts[0], pts[per_piece - 1] = a, b  # the ends exactly
        ts.append(pts)
        owner += [j] * len(pts)
    return torch.cat(ts), owner


def _check_pieces_sound(b, F, w, d, seed: int, context=None) -> None:
    ts, owner = _sample_points(b.pieces, seed)
    second = _phi_second(F, w, d, ts).tolist()
    assert all(math.isfinite(v) for v in second), ("the reference phi'' is not finite", context)
    for t, j, p2 in zip(ts.tolist(), owner, second):
        a, bb, S = b.pieces[j]
        assert p2 <= S + RTOL * abs(S) + ATOL, (
            f"phi''({t!r}) = {p2!r} exceeds S_{j} = {S!r} on piece [{a!r}, {bb!r}]", context)


def _check_decrease(b, F, w, d, context=None) -> float:
    f0 = _value(F, w)
    actual = f0 - _value(F, w - b.step * d)
    assert math.isfinite(actual), ("the reference decrease is not finite", context)
    assert actual >= b.guaranteed_decrease - 1e-12 * (1 + abs(f0)), (
        f"actual decrease {actual!r} < guaranteed {b.guaranteed_decrease!r} at T = {b.step!r}", context)
    return actual


def _check_start(b, F, w, d, context=None) -> None:
    g, curv = _grad_and_curvature(F, w, d)
    slope = -float((g * d).sum())
    assert _close(b.slope, slope), ("slope", b.slope, slope, context)
    assert _close(b.curvature_at_start, curv), ("curvature_at_start", b.curvature_at_start, curv, context)


# ----------------------------------------------------------------------------------------------
# 1. exact start: slope and curvature


@settings(max_examples=30, deadline=None)
@given(case=mlp_cases())
def test_slope_and_start_curvature_are_exact(case):
    model, x, y, F, w, d = _build(case)
    b = segment_bound(model, x, y, d, case["step"], loss=case["loss"], l2=case["l2"], pieces=case["pieces"])
    _check_start(b, F, w, d, case)  # only the start: the pieces are the next tests' business


# ----------------------------------------------------------------------------------------------
# 2. the core: every S_j bounds phi'' on its piece


@settings(max_examples=60, deadline=None)
@given(case=mlp_cases())
def test_every_piece_bounds_the_curvature(case):
    model, x, y, F, w, d = _build(case)
    b = segment_bound(model, x, y, d, case["step"], loss=case["loss"], l2=case["l2"], pieces=case["pieces"])
    _check_structure(b, case["step"])
    _check_pieces_sound(b, F, w, d, case["seed"], case)


# ----------------------------------------------------------------------------------------------
# 3. the guaranteed decrease is a real decrease


@settings(max_examples=30, deadline=None)
@given(case=mlp_cases())
def test_guaranteed_decrease_is_below_the_actual_one(case):
    model, x, y, F, w, d = _build(case)
    b = segment_bound(model, x, y, d, case["step"], loss=case["loss"], l2=case["l2"], pieces=case["pieces"])
    _check_structure(b, case["step"])
    _check_decrease(b, F, w, d, case)


@settings(max_examples=30, deadline=None)
@given(case=mlp_cases())
def test_certified_step_along_the_gradient_decreases(case):
    case = {**case, "direction": "gradient"}
    model, x, y, F, w, d = _build(case)
    b = certified_segment_step(model, x, y, d, loss=case["loss"], l2=case["l2"], pieces=case["pieces"])
    _check_structure(b)
    _check_start(b, F, w, d, case)
    _check_pieces_sound(b, F, w, d, case["seed"], case)
    actual = _check_decrease(b, F, w, d, case)
    if float(d.norm()) > 1e-8:
        assert b.slope < 0, (b.slope, case)
        assert b.guaranteed_decrease > 0, (b, case)
        assert actual > 0, (actual, b, case)


# ----------------------------------------------------------------------------------------------
# 4. a small CNN


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["gradient", "random"])
@pytest.mark.parametrize("step", [1e-3, 0.3, 5.0])
def test_small_cnn(seed, kind, step):
    model = _cnn(seed)
    x, y = _batch(seed, 3, (1, 4, 4), 3, "cross-entropy")
    l2 = 0.1 if seed == 2 else 0.0
    F = _objective(model, x, y, "cross-entropy", l2)
    w = _flat_params(model)
    d = _direction(kind, F, w, seed)
    context = dict(seed=seed, kind=kind, step=step, l2=l2)
    b = segment_bound(model, x, y, d, step, loss="cross-entropy", l2=l2)
    _check_structure(b, step)
    _check_start(b, F, w, d, context)
    _check_pieces_sound(b, F, w, d, seed, context)
    _check_decrease(b, F, w, d, context)
    if kind == "gradient":
        c = certified_segment_step(model, x, y, d, loss="cross-entropy", l2=l2)
        _check_structure(c)
        _check_start(c, F, w, d, context)
        _check_pieces_sound(c, F, w, d, seed, context)
        actual = _check_decrease(c, F, w, d, context)
        assert c.guaranteed_decrease > 0 and actual > 0, (c, actual, context)


def _far_softplus_case(target: float):
    """x = 1 through w1 -> softplus -> w2 (no bias, square loss); along d = (-799, 0) the
    pre-activation 1 + 799 t passes beta z ~ 709 at t ~ 0.89, where exp(beta z) overflows in
    float64 although phi(t) = (softplus(1 + 799 t) - target)^2 / 2 is smooth and finite."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Softplus(beta=1.0, threshold=1e9),
                          nn.Linear(1, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.fill_(1.0)
    x, y = torch.ones(1, 1, dtype=DT), torch.full((1, 1), target, dtype=DT)
    return model, x, y, torch.tensor([-799.0, 0.0], dtype=DT)


@pytest.mark.parametrize("pieces", [1, 2, 8])
def test_segment_through_the_overflow_range_of_softplus(pieces):
    model, x, y, d = _far_softplus_case(0.0)
    F, w = _objective(model, x, y, "square", 0.0), _flat_params(model)
    b = segment_bound(model, x, y, d, 2.0, loss="square", pieces=pieces)
    _check_structure(b, 2.0)
    _check_pieces_sound(b, F, w, d, 0, pieces)
    _check_decrease(b, F, w, d, pieces)


@pytest.mark.parametrize("start", [None, 2.0])
def test_certified_step_through_the_overflow_range_of_softplus(start):
    model, x, y, d = _far_softplus_case(1e4)  # a descent direction: softplus grows towards the target
    F, w = _objective(model, x, y, "square", 0.0), _flat_params(model)
    b = certified_segment_step(model, x, y, d, loss="square", start=start)
    _check_structure(b)
    _check_pieces_sound(b, F, w, d, 0, start)
    actual = _check_decrease(b, F, w, d, start)
    assert b.guaranteed_decrease > 0 and actual > 0, (b, actual)


# ----------------------------------------------------------------------------------------------
# 5. weights (and inputs) untouched; float32 models


def _snapshot(model: nn.Module):
    return [(n, p.dtype, p.detach().clone()) for n, p in model.named_parameters()]


def _assert_same(model: nn.Module, snap) -> None:
    now = list(model.named_parameters())
    assert [n for n, _ in now] == [n for n, _, _ in snap]
    for (n, p), (_, dtype, before) in zip(now, snap):
        assert p.dtype == dtype, f"{n} changed dtype {dtype} -> {p.dtype}"
        assert torch.equal(p.detach(), before), f"{n} was modified"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_weights_and_inputs_untouched(dtype, model_name):
    if model_name == "mlp":
        model = _mlp(7, 4, [6, 5], 3, ["tanh", "softplus:3"], True, 1.0)
        x, y = _batch(7, 5, (4,), 3, "cross-entropy")
    else:
        model = _cnn(7)
        x, y = _batch(7, 3, (1, 4, 4), 3, "cross-entropy")
    model = model.to(dtype)
    x = x.to(dtype)
    F = _objective(model, x, y, "cross-entropy", 0.1)  # on a float64 copy of the same numbers
    w = _flat_params(model)
    d = _direction("gradient", F, w, 7).to(dtype)
    snap = _snapshot(model)
    x0, y0, d0 = x.clone(), y.clone(), d.clone()

    b = segment_bound(model, x, y, d, 0.5, loss="cross-entropy", l2=0.1)
    _assert_same(model, snap)
    c = certified_segment_step(model, x, y, d, loss="cross-entropy", l2=0.1)
    _assert_same(model, snap)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(d, d0), "inputs modified"
    for r in (b, c):
        assert all(math.isfinite(v) for v in (r.step, r.slope, r.curvature_at_start, r.curvature_bound,
                                               r.guaranteed_decrease)), r
        _check_structure(r)
        # sound against the float64 copy (float32 -> float64 is exact, so it is the same F)
        _check_pieces_sound(r, F, w, d.to(DT), 7, (dtype, model_name))
        _check_decrease(r, F, w, d.to(DT), (dtype, model_name))
    assert c.guaranteed_decrease > 0


# ----------------------------------------------------------------------------------------------
# 6. tightness: the bound tends to phi''(0) as T -> 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("loss", ["cross-entropy", "square"])
@pytest.mark.parametrize("kind", ["gradient", "random"])
def test_bound_tends_to_start_curvature(seed, loss, kind):
    model = _mlp(seed, 3, [8, 6], 3, ["tanh", "tanh"], True, 1.5)
    x, y = _batch(seed, 4, (3,), 3, loss)
    F = _objective(model, x, y, loss, 0.0)
    w = _flat_params(model)
    d = _direction(kind, F, w, seed)
    curv0 = _grad_and_curvature(F, w, d)[1]
    b = segment_bound(model, x, y, d, 1e-6, loss=loss)
    assert b.curvature_bound >= curv0 - RTOL * abs(curv0) - ATOL  # sound at t = 0
    assert b.curvature_bound - curv0 <= 1e-3 * (1 + abs(curv0)), (
        f"T = 1e-6: bound {b.curvature_bound!r} vs phi''(0) = {curv0!r}")


# ----------------------------------------------------------------------------------------------
# 7. bad input


def _tiny_batch(m=2, shape=(3,), classes=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn((m, *shape), generator=g, dtype=DT), torch.tensor([0, 1] * (m // 2) + [0] * (m % 2))


def _both_calls(model, x, y, d, step=0.5, **kw):
    yield lambda: segment_bound(model, x, y, d, step, **kw)
    yield lambda: certified_segment_step(model, x, y, d, **kw)


def test_segment_error_is_a_value_error():
    assert issubclass(SegmentError, ValueError)


@pytest.mark.parametrize("name", ["ReLU", "MaxPool2d", "BatchNorm1d"])
def test_unsupported_modules_are_named(name):
    torch.manual_seed(0)
    if name == "ReLU":
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        x, y = _tiny_batch()
    elif name == "MaxPool2d":
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(8, 2)).double()
        x, y = _tiny_batch(shape=(1, 4, 4))
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
        x, y = _tiny_batch()
    d = torch.ones(sum(p.numel() for p in model.parameters()), dtype=DT)
    culprit = next(n for n, sub in model.named_children() if type(sub).__name__ == name)
    for call in _both_calls(model, x, y, d):
        # named by its class or by its name in the model (here the index in the Sequential)
        with pytest.raises(SegmentError, match=f"{name}|'{culprit}'"):
            call()


def _good_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = _tiny_batch()
    n = sum(p.numel() for p in model.parameters())
    return model, x, y, torch.ones(n, dtype=DT)


def test_good_case_is_accepted():
    """The bad-input tests below differ from this case in one thing only."""
    model, x, y, d = _good_case()
    for call in _both_calls(model, x, y, d):
        call()


def test_unknown_loss():
    model, x, y, d = _good_case()
    for call in _both_calls(model, x, y, d, loss="hinge"):
        with pytest.raises(SegmentError):
            call()


@pytest.mark.parametrize("delta", [-1, 1])
def test_direction_of_the_wrong_length(delta):
    model, x, y, d = _good_case()
    bad = torch.ones(d.numel() + delta, dtype=DT)
    for call in _both_calls(model, x, y, bad):
        with pytest.raises(SegmentError):
            call()


@pytest.mark.parametrize("step", [0.0, -1.0, math.nan, math.inf])
def test_bad_step(step):
    model, x, y, d = _good_case()
    with pytest.raises(SegmentError):
        segment_bound(model, x, y, d, step)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_batch(value):
    model, x, y, d = _good_case()
    x = x.clone()
    x[1, 2] = value
    for call in _both_calls(model, x, y, d):
        with pytest.raises(SegmentError):
            call()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_direction(value):
    model, x, y, d = _good_case()
    d = d.clone()
    d[3] = value
    for call in _both_calls(model, x, y, d):
        with pytest.raises(SegmentError):
            call()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certified_step_recovers_from_a_tiny_start(seed):
    """A far too short previous step (``start``) does not pin the next one: the search grows
    the step to the segment's own fixed point, sound all along."""
    model = _mlp(seed, 4, [6, 6], 3, ["tanh", "sigmoid"], True, 1.0)
    x, y = _batch(seed, 5, (4,), 3, "cross-entropy")
    F = _objective(model, x, y, "cross-entropy", 0.0)
    w = _flat_params(model)
    d = _direction("gradient", F, w, seed)
    free = certified_segment_step(model, x, y, d)
    tiny = certified_segment_step(model, x, y, d, start=1e-9)
    assert tiny.step >= 0.3 * free.step, (tiny.step, free.step)
    assert tiny.guaranteed_decrease > 0
    assert float(F(w) - F(w - tiny.step * d)) >= tiny.guaranteed_decrease - 1e-12 * (1 + abs(float(F(w))))
