"""Soundness of every component's declared constants (smoothchain.components, smoothchain.objective).

Each component declares, for a batch of ``m`` examples of a per-example shape, either
(L_beta, l_beta^v, l_beta^z, ||beta^0||) (bi-affine parts, RH Prop. 4.4 and App. A.4) or
(m_a, l_a, L_a, ||a(0)||, ||grad a(0)||) (non-linear parts), all with respect to the Euclidean norm
of the whole vectorised batch (RH Sec. 2.3).  Here every constant is estimated independently, in
float64, from a plain PyTorch implementation of the component (checked against the library's own
``torch_module`` and against PyTorch's ``F.batch_norm``):

* m_a: max ||a(x)|| over random points of many scales and over points where a saturates;
* l_a: max of the Jacobian's spectral norm (dense ``jacrev``; power iteration with ``jvp``/``vjp``
  as a cross-check) and of finite-difference ratios ||a(x) - a(y)|| / ||x - y||;
* L_a: max of ||grad^2 a(x)||_{2,2,2} (RH Def. A.1, Fact A.3) by alternating maximisation over
  (w, u, v) of the dense second-derivative tensor (and matrix-free on (u, v) -> d^2 a(x)[u, v]),
  and of Jacobian-difference ratios ||J(x) - J(y)||_op / ||x - y||, at random points and at the
  points where the curvature peaks (sigmoid at sigma = 1/2 +- 1/(2 sqrt 3), tanh at 1/sqrt 3,
  softmax at p = (1/2 + 1/(2 sqrt 3), 1/2 - 1/(2 sqrt 3), 0, ...), batch norm at
  ||x_c||^2 / m = c eps for c in {1/4, (1 + sqrt 5)/4, ...});
* ||a(0)||, ||grad a(0)||: exact at 0 (one-sided Jacobians for ReLU and max pooling);
* L_beta = ||B||_{2,2,2} of the bilinear tensor (dense, and by alternating power iteration over
  (v, z)); l_beta^v = the norm of the bias-broadcast map.

Every estimate must stay below the declared constant (relative slack 1e-6); constants the
docstrings call exact must be met; in ``tight`` mode the estimates must come close to the tight
constants (so the estimators are strong enough), and halving a constant by monkeypatching makes
the very same check fail (``test_halved_constant_is_caught``).  Losses (RH App. B.1-B.2) are
checked the same way.  Proofs of the tight constants: ``docs/tight-constants.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.func import jacfwd, jacrev, jvp, vjp, vmap  # noqa: E402

from smoothchain import objective  # noqa: E402
from smoothchain.components import (  # noqa: E402
    BATCHNORM_SMOOTHNESS_FACTOR,
    SIGMOID_SMOOTHNESS,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm,
    ChannelAffine,
    Conv2d,
    Linear,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
    _multiplicity_1d,
    _window_out,
)
from smoothchain.torch_chain import torch_module  # noqa: E402

DT = torch.float64



MODES = ("paper", "tight")
REL = 1e-6  # relative slack of the soundness assertions
ABS = 1e-12  # absolute slack (declared zeros, e.g. the smoothness of linear pooling)
NONLINEAR_FIELDS = ("bound", "lipschitz", "smoothness", "value_at_zero", "jacobian_at_zero")
BILINEAR_FIELDS = ("smoothness", "weight_lipschitz", "input_lipschitz", "offset_norm")
SIGMOID_PEAK = math.log(2.0 + math.sqrt(3.0))  # sigma(x) = 1/2 + 1/(2 sqrt 3): |sigma''| = sqrt(3)/18
TANH_PEAK = math.atanh(1.0 / math.sqrt(3.0))  # tanh(x) = 1/sqrt 3: |tanh''| = 4/(3 sqrt 3)
BN_C_GOLDEN = (1.0 + math.sqrt(5.0)) / 4.0  # maximiser of the Prop. B.2 proof's bound
BN_TRUE_PEAK = 48.0 * math.sqrt(5.0) / 125.0  # sup ||grad^2 g|| * m^1/2 eps (at c = 1/4; docs remark)
BN_C_GRID = (1.0 / 16.0, 0.25, 0.5, BN_C_GOLDEN, 1.0, 2.0, 8.0)


# =============================================================================== estimators


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=DT) * scale


def _unit(x: torch.Tensor) -> torch.Tensor:
    n = x.norm()
    return x / n if n > 0 else x


def spectral_norm(M) -> float:
    """||M||_{2,2} (dense SVD)."""
    M = np.asarray(M)
    return float(np.linalg.svd(M, compute_uv=False)[0]) if M.size else 0.0


def spectral_norms(Ms: torch.Tensor) -> np.ndarray:
    """Spectral norms of a stack of matrices."""
    Ms = Ms.detach().numpy()
    return np.linalg.svd(Ms, compute_uv=False)[..., 0] if Ms.size else np.zeros(Ms.shape[0])


def dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian of fn at x as an (outputs x inputs) matrix."""
    return jacrev(fn)(x).reshape(-1, x.numel())


def batched_jacobians(fn, X: torch.Tensor) -> torch.Tensor:
    """Jacobians at every point X[i] (one vmapped jacrev), shape (points, outputs, inputs)."""
    return vmap(jacrev(fn))(X).reshape(X.shape[0], -1, X[0].numel())


def batched_second_derivatives(fn, X: torch.Tensor) -> torch.Tensor:
    """T[i, o, j, k] = d^2 fn(X[i])_o / dx_j dx_k (RH App. A.3), forward-over-reverse, vmapped."""
    n = X[0].numel()
    return vmap(jacfwd(jacrev(fn)))(X).reshape(X.shape[0], -1, n, n)


def tensor_norm(T, seed: int = 0, restarts: int = 1, iters: int = 60, starts=()) -> float:
    """A lower estimate of ||T||_{2,2,2} = sup T[w, u, v] / (|w| |u| |v|) (RH Def. A.1).

    Alternating maximisation: for fixed w the best (u, v) is the top singular pair of
    sum_k w_k T_k; for fixed (u, v) the best w is T[., u, v] normalised.  The value never
    decreases and every value is attained by unit vectors, so it is a valid lower bound.
    Starts: the top left singular vector of the unfolding, the slice of largest spectral norm,
    the given ``starts`` and ``restarts`` random w.
    """
    T = np.asarray(T.detach().numpy() if isinstance(T, torch.Tensor) else T)
    p = T.shape[0]
    if T.size == 0 or not np.any(T):
        return 0.0
    starts = [np.linalg.svd(T.reshape(p, -1), full_matrices=False)[0][:, 0], np.eye(p)[int(np.argmax(
        np.linalg.svd(T, compute_uv=False)[:, 0]))]] + [np.asarray(w, dtype=float).reshape(p) for w in starts]
    rng = np.random.default_rng(seed)
    starts += [rng.standard_normal(p) for _ in range(restarts)]
    best = 0.0
    for w in starts:
        w, value = w / np.linalg.norm(w), 0.0
        for _ in range(iters):
            U, _, Vh = np.linalg.svd(np.tensordot(w, T, axes=1))
            g = np.einsum("kij,i,j->k", T, U[:, 0], Vh[0])
            new = float(np.linalg.norm(g))
            if new == 0.0:
                break
            w = g / new
            if new <= value * (1.0 + 1e-10):
                value = max(value, new)
                break
            value = new
        best = max(best, value)
    return best


def jacobian_norm_power(fn, x: torch.Tensor, gen: torch.Generator, iters: int = 100) -> float:
    """||grad fn(x)||_{2,2} by power iteration on J^T J with jvp/vjp (matrix-free)."""
    _, pull = vjp(fn, x)
    u, best = _unit(_randn(x.shape, gen)), 0.0
    for _ in range(iters):
        Ju = jvp(fn, (x,), (u,))[1]
        value = float(Ju.norm())
        if value <= best * (1.0 + 1e-12):
            break
        best = value
        u = _unit(pull(Ju)[0])
    return best


def second_directional(fn, x, u, v):
    """d^2 fn(x)[u, v] by forward-over-forward differentiation."""
    return jvp(lambda y: jvp(fn, (y,), (u,))[1], (x,), (v,))[1]


def hessian_norm_power(fn, x: torch.Tensor, gen: torch.Generator, iters: int = 30, start=None) -> float:
    """||grad^2 fn(x)||_{2,2,2} by alternating power iteration on (u, v) -> d^2 fn(x)[u, v]:
    w <- d^2 fn(x)[u, v], u <- d^2 fn(x)[., v]^T w (a vjp of the map linear in u), then v."""
    u = _unit(start.clone() if start is not None else _randn(x.shape, gen))
    v, best = u.clone(), 0.0
    for _ in range(iters):
        w = second_directional(fn, x, u, v)
        value = float(w.norm())
        if value == 0.0 or value <= best * (1.0 + 1e-10):
            break
        best, w = value, w / value
        _, pull = vjp(lambda uu: second_directional(fn, x, uu, v), u)
        u = _unit(pull(w)[0])
        _, pull = vjp(lambda vv: second_directional(fn, x, u, vv), v)
        v = _unit(pull(w)[0])
    return best


def bilinear_power(beta, v_shape, z_shape, gen, iters: int = 100, starts=None) -> float:
    """sup ||beta(v, z)|| / (|v| |z|) by alternating power iteration over v and z (matrix-free).

    For fixed z, v -> beta(v, z) is linear: a power step v <- A_z^T A_z v is a ``vjp`` of the
    map at v with cotangent beta(v, z); then the same for z.  ||beta(v, z)|| never decreases.
    """
    if starts is None:
        starts = [(_randn(v_shape, gen), _randn(z_shape, gen))]
    best = 0.0
    for v, z in starts:
        v, z, value = _unit(v), _unit(z), 0.0
        for _ in range(iters):
            y, pull = vjp(lambda vv: beta(vv, z), v)
            v = _unit(pull(y)[0])
            y, pull = vjp(lambda zz: beta(v, zz), z)
            z = _unit(pull(y)[0])
            new = float(beta(v, z).norm())
            if new <= value * (1.0 + 1e-9):
                value = max(value, new)
                break
            value = new
        best = max(best, value)
    return best


# =============================================================================== reference maps


def _batchnorm_fn(eps: float, over: str):
    """RH eq. (11) on a batch x of shape (m, ...): over="entry" normalises every entry across
    dim 0; over="channel" normalises every channel (dim 1) across the batch and positions."""

    def fn(x):
        dims = (0,) if over == "entry" else (0,) + tuple(range(2, x.dim()))
        xc = x - x.mean(dim=dims, keepdim=True)
        var = (xc * xc).mean(dim=dims, keepdim=True)
        return xc / torch.sqrt(var + eps)

    return fn


def reference(comp):
    """A float64 PyTorch implementation of a non-linear component, on the whole batch."""
    if isinstance(comp, ReLU):
        return torch.relu
    if isinstance(comp, Softplus):
        b = comp.beta
        return lambda x: torch.logaddexp(torch.zeros_like(x), b * x) / b  # no threshold, no overflow
    if isinstance(comp, Sigmoid):
        return torch.sigmoid
    if isinstance(comp, Tanh):
        return torch.tanh
    if isinstance(comp, Softmax):
        return lambda x: torch.softmax(x, dim=-1)
    if isinstance(comp, MaxPool2d):
        return lambda x: F.max_pool2d(x, comp.kernel_size, comp.stride, comp.padding, ceil_mode=comp.ceil_mode)
    if isinstance(comp, AvgPool2d):
        return lambda x: F.avg_pool2d(
            x, comp.kernel_size, comp.stride, comp.padding, ceil_mode=comp.ceil_mode, count_include_pad=True
        )
    if isinstance(comp, AdaptiveAvgPool2d):
        return lambda x: F.adaptive_avg_pool2d(x, comp.output_size)
    if isinstance(comp, BatchNorm):
        return _batchnorm_fn(comp.eps, comp.over)
    raise TypeError(comp)


def _bn_groups(comp: BatchNorm, shape, m) -> int:
    """Number of samples normalised together (m_eff)."""
    return m if comp.over == "entry" else m * math.prod(shape[1:])


def _bn_point(x: torch.Tensor, comp: BatchNorm, c: float) -> torch.Tensor:
    """x centred per normalisation group and rescaled so that ||x_group||^2 / m_eff = c eps."""
    dims = (0,) if comp.over == "entry" else (0,) + tuple(range(2, x.dim()))
    xc = x - x.mean(dim=dims, keepdim=True)
    ms = (xc * xc).mean(dim=dims, keepdim=True)
    return xc * torch.sqrt(c * comp.eps / ms)


def _smooth(comp) -> bool:
    return not isinstance(comp, (ReLU, MaxPool2d))


def _points(comp, shape, m, gen):
    """(label, point, curvature?) triples: random points of many scales plus peaks of the
    component's curvature/slope/size.  ``curvature`` marks points where the (costly) dense
    second-derivative tensor is also evaluated."""
    full = (m,) + tuple(shape)
    ones = torch.ones(full, dtype=DT)
    scale = math.sqrt(comp.eps) if isinstance(comp, BatchNorm) else 1.0
    pts = [("zero", torch.zeros(full, dtype=DT), True)]
    for s in (1e-3, 0.5, 2.0, 30.0, 1e3):
        pts.append((f"randn*{s:g}", _randn(full, gen, s * scale), s in (0.5, 2.0)))
    if isinstance(comp, Sigmoid):
        signs = torch.where(_randn(full, gen) > 0, 1.0, -1.0).to(DT)
        pts += [("sigma''-peak", SIGMOID_PEAK * ones, True), ("sigma''-peak+-", SIGMOID_PEAK * signs, True),
                ("saturated", 40.0 * ones, False)]
    elif isinstance(comp, Tanh):
        pts += [("tanh''-peak", TANH_PEAK * ones, True), ("tanh''-peak-neg", -TANH_PEAK * ones, True),
                ("saturated", 40.0 * ones, False)]
    elif isinstance(comp, Softplus):
        pts += [("saturated", (60.0 / comp.beta) * ones, False), ("near-zero", _randn(full, gen, 0.05), True)]
    elif isinstance(comp, Softmax):
        k = shape[-1]

        def rows(*head):
            r = torch.full(full, -60.0, dtype=DT)
            r[..., : min(k, len(head))] = torch.tensor(head[:k], dtype=DT)
            return r

        pts += [("one-hot", rows(60.0), False), ("two-way-tie", rows(0.0, 0.0), True),
                ("softmax''-peak", rows(SIGMOID_PEAK, 0.0), True), ("three-way", rows(0.3, 0.0, -0.2), True)]
    elif isinstance(comp, BatchNorm) and _bn_groups(comp, shape, m) >= 2:
        base = _randn(full, gen)
        pts += [(f"||x||^2/m={c:.4g}eps", _bn_point(base, comp, c), True) for c in BN_C_GRID]
        pts += [(f"||x||^2/m={c:.4g}eps(2)", _bn_point(_randn(full, gen), comp, c), True)
                for c in (0.25, BN_C_GOLDEN)]
        pts.append(("saturated ||x||^2/m=1e8eps", _bn_point(base, comp, 1e8), False))
    return pts


def _one_sided_points(comp, shape, m, gen):
    """Points t u with t -> 0+ where a positively homogeneous piecewise-linear component
    (ReLU, max pooling) is differentiable: their Jacobians are its one-sided Jacobians at 0."""
    full = (m,) + tuple(shape)
    pts = []
    if isinstance(comp, ReLU):
        for _ in range(4):
            pts.append(1e-9 * _randn(full, gen))
    elif isinstance(comp, MaxPool2d):
        # input position (h, w) of example 0 / channel 0 wins every window that reads it
        for h in range(shape[1]):
            for w in range(shape[2]):
                u = -1e-3 * _randn(full, gen).abs() - 1e-6
                u[0, 0, h, w] = 1.0
                pts.append(1e-6 * u)
    return pts


@functools.lru_cache(maxsize=None)
def nonlinear_estimates(comp, shape: tuple, m: int, seed: int = 0) -> dict:
    """Independent estimates of (m_a, l_a, L_a, ||a(0)||, ||grad a(0)||), with where they occur.

    All points are processed at once (vmap over points) to keep the transforms' overhead low."""
    fn, gen = reference(comp), _gen(seed)
    pts = _points(comp, shape, m, gen)
    labels = [p[0] for p in pts]
    X = torch.stack([p[1] for p in pts])
    curv = [i for i, p in enumerate(pts) if p[2] and _smooth(comp)]
    est = {f: 0.0 for f in NONLINEAR_FIELDS}
    where = {f: "" for f in NONLINEAR_FIELDS}

    def record(field, values, describe):
        values = np.asarray(values, dtype=float).reshape(-1)
        i = int(np.argmax(values)) if values.size else 0
        if values.size and values[i] > est[field]:
            est[field], where[field] = float(values[i]), describe(i)

    Y = vmap(fn)(X).flatten(1)
    record("bound", Y.norm(dim=1), lambda i: labels[i])
    Js = batched_jacobians(fn, X)
    record("lipschitz", spectral_norms(Js), lambda i: f"Jacobian at {labels[i]}")
    # finite differences: far pairs (consecutive points) and near pairs
    dX, dY = (X[1:] - X[:-1]).flatten(1).norm(dim=1), (Y[1:] - Y[:-1]).norm(dim=1)
    record("lipschitz", dY / dX, lambda i: f"FD {labels[i]} / {labels[i + 1]}")
    scale = math.sqrt(comp.eps) if isinstance(comp, BatchNorm) else 1.0
    steps = 1e-4 * (X.flatten(1).norm(dim=1) / math.sqrt(X[0].numel()) + scale)
    Hdir = _randn(X.shape, gen)
    Hdir = Hdir / Hdir.flatten(1).norm(dim=1).view((-1,) + (1,) * (X.dim() - 1))
    Hstep = Hdir * steps.view((-1,) + (1,) * (X.dim() - 1))
    record("lipschitz", (vmap(fn)(X + Hstep).flatten(1) - Y).norm(dim=1) / steps, lambda i: f"FD near {labels[i]}")
    if curv:
        Xc = X[curv]
        T = batched_second_derivatives(fn, Xc)
        record("smoothness", [tensor_norm(t, seed=k) for k, t in enumerate(T)],
               lambda i: f"Hessian tensor at {labels[curv[i]]}")
        Jn = batched_jacobians(fn, Xc + Hstep[curv])
        record("smoothness", spectral_norms(Jn - Js[curv]) / steps[curv].numpy(),
               lambda i: f"Jacobian difference near {labels[curv[i]]}")
    if not _smooth(comp):
        est["smoothness"] = None  # declared inf: not C^1
    # values at zero (pts[0] is 0)
    est["value_at_zero"], where["value_at_zero"] = float(Y[0].norm()), "0"
    est["jacobian_at_zero"], where["jacobian_at_zero"] = spectral_norm(Js[0]), "autograd convention at 0"
    one_sided = _one_sided_points(comp, shape, m, gen)
    if one_sided:
        norms = spectral_norms(batched_jacobians(fn, torch.stack(one_sided)))
        record("jacobian_at_zero", norms, lambda i: f"one-sided Jacobian at 0 (direction {i})")
        record("lipschitz", norms, lambda i: f"Jacobian near 0 (direction {i})")
    return {"est": est, "where": where}


def check_constants(declared, estimates: dict, fields, context: str, exact=(), reach=None, mode="tight"):
    """Soundness (estimate <= declared), exactness, and (tight mode) estimator strength."""
    est, where = estimates["est"], estimates["where"]
    for field in fields:
        value, bound = est[field], getattr(declared, field)
        if value is None:
            assert math.isinf(bound), f"{context}: {field} not estimable (non-C^1) but declared finite {bound}"
            continue
        assert value <= bound * (1.0 + REL) + ABS, (
            f"UNSOUND {context} [{mode}]: {field} estimate {value!r} > declared {bound!r} "
            f"(at {where.get(field, '?')})"
        )
    for field in exact:
        value, bound = est[field], getattr(declared, field)
        assert value == pytest.approx(bound, rel=1e-6, abs=1e-12), (
            f"{context} [{mode}]: {field} is claimed exact: declared {bound!r}, computed {value!r}"
        )
    if mode == "tight":
        for field, frac in (reach or {}).items():
            value, bound = est[field], getattr(declared, field)
            assert value >= frac * bound, (
                f"{context} [{mode}]: estimator too weak for {field}: {value!r} < {frac} x {bound!r}"
            )


# =============================================================================== non-linear cases


def _case(comp, shape, m, exact=(), reach=None, tag=""):
    shape_id = "x".join(str(s) for s in shape)
    return pytest.param(comp, tuple(shape), m, tuple(exact), reach or {},
                        id=f"{tag or comp.label}-{shape_id}-m{m}")


Z0 = ("value_at_zero", "jacobian_at_zero")
NONLINEAR_CASES = [
    _case(ReLU(), (5,), 1, Z0, {"lipschitz": 0.999999}),
    _case(ReLU(), (2, 2, 2), 3, Z0, {"lipschitz": 0.999999}),
    _case(Softplus(), (5,), 1, Z0, {"lipschitz": 0.999999, "smoothness": 0.999999}),
    _case(Softplus(), (2, 3), 2, Z0, {"lipschitz": 0.999999, "smoothness": 0.999999}),
    _case(Softplus(2.5), (1, 2, 2), 2, Z0, {"lipschitz": 0.999999, "smoothness": 0.999999}, "softplus2.5"),
    _case(Sigmoid(), (5,), 1, Z0, {"bound": 0.999999, "lipschitz": 0.999999, "smoothness": 0.999999}),
    _case(Sigmoid(), (2, 3), 2, Z0, {"bound": 0.999999, "lipschitz": 0.999999, "smoothness": 0.999999}),
    _case(Tanh(), (4,), 1, Z0, {"bound": 0.999999, "lipschitz": 0.999999, "smoothness": 0.999999}),
    _case(Tanh(), (1, 2, 3), 2, Z0, {"bound": 0.999999, "lipschitz": 0.999999, "smoothness": 0.999999}),
    _case(Softmax(), (2,), 1, Z0, {"bound": 0.999999, "lipschitz": 0.999999, "smoothness": 0.27}),
    _case(Softmax(), (4,), 2, Z0, {"bound": 0.999999, "lipschitz": 0.999999, "smoothness": 0.27}),
    _case(Softmax(), (2, 3), 2, Z0, {"bound": 0.999999, "lipschitz": 0.999999, "smoothness": 0.27}),
    _case(Softmax(), (1,), 2, ("value_at_zero",), {"bound": 0.999999}, "softmax-k1"),
    _case(MaxPool2d(2), (1, 4, 4), 2, Z0, {"lipschitz": 0.999999}),
    _case(MaxPool2d(3, 1), (1, 5, 5), 1, Z0, {"lipschitz": 0.999999}, "maxpool3s1"),
    _case(MaxPool2d(3, 2, 1), (2, 5, 5), 1, Z0, {"lipschitz": 0.999999}, "maxpool3s2p1"),
    _case(MaxPool2d(2, 2, 0, True), (1, 5, 5), 1, Z0, {"lipschitz": 0.999999}, "maxpool2ceil"),
    _case(MaxPool2d((2, 3), (1, 2)), (1, 4, 5), 2, Z0, {"lipschitz": 0.999999}, "maxpool2x3s1x2"),
    _case(AvgPool2d(2), (1, 4, 4), 2, Z0, {"lipschitz": 0.999999}),
    _case(AvgPool2d(2, 2, 1), (2, 4, 4), 1, Z0, {"lipschitz": 0.999999}, "avgpool2p1"),
    _case(AvgPool2d(3, 1), (1, 5, 5), 1, ("value_at_zero",), {"lipschitz": 0.5}, "avgpool3s1"),
    _case(AvgPool2d(3, 2, 1), (1, 6, 6), 2, ("value_at_zero",), {"lipschitz": 0.6}, "avgpool3s2p1"),
    _case(AvgPool2d(2, 2, 0, True), (1, 4, 4), 1, Z0, {"lipschitz": 0.999999}, "avgpool2ceil-exact-fit"),
    _case(AdaptiveAvgPool2d(2), (1, 4, 4), 2, Z0, {"lipschitz": 0.999999}, "adaptive2"),
    _case(AdaptiveAvgPool2d(3), (1, 5, 5), 1, ("value_at_zero",), {"lipschitz": 0.7}, "adaptive3"),
    _case(AdaptiveAvgPool2d((3, 2)), (2, 7, 5), 1, ("value_at_zero",), {"lipschitz": 0.7}, "adaptive3x2"),
    _case(AdaptiveAvgPool2d(4), (1, 4, 4), 1, Z0, {"lipschitz": 0.999999}, "adaptive-identity"),
    _case(BatchNorm(1e-2), (3,), 2, Z0, {"bound": 0.999, "lipschitz": 0.999999, "smoothness": 0.53},
          "bn-entry-eps0.01"),
    _case(BatchNorm(1.0), (2,), 4, Z0, {"bound": 0.999, "lipschitz": 0.999999, "smoothness": 0.53}, "bn-entry-eps1"),
    _case(BatchNorm(0.3), (1, 2, 2), 3, Z0, {"bound": 0.999, "lipschitz": 0.999999, "smoothness": 0.53},
          "bn-entry-eps0.3"),
    _case(BatchNorm(0.5), (3,), 1, ("value_at_zero",), {}, "bn-entry-m1"),
    _case(BatchNorm(0.1, "channel"), (2, 2, 2), 2, Z0, {"bound": 0.999, "lipschitz": 0.999999, "smoothness": 0.53},
          "bn-channel-eps0.1"),
    _case(BatchNorm(2.0, "channel"), (1, 3, 1), 1, Z0, {"bound": 0.999, "lipschitz": 0.999999, "smoothness": 0.53},
          "bn-channel-eps2"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("comp, shape, m, exact, reach", NONLINEAR_CASES)
def test_nonlinear_constants_are_sound(comp, shape, m, exact, reach, mode):
    declared = comp.constants(shape, m, mode)
    check_constants(declared, nonlinear_estimates(comp, shape, m), NONLINEAR_FIELDS,
                    f"{comp!r} shape={shape} m={m}", exact, reach, mode)


@pytest.mark.parametrize("comp, shape, m, exact, reach", NONLINEAR_CASES)
def test_reference_matches_library_module_and_shape_rule(comp, shape, m, exact, reach):
    """The reference maps are the library's modules (torch_module; F.batch_norm per channel)."""
    x = _randn((m,) + shape, _gen(1), 2.0)
    ours = reference(comp)(x)
    assert tuple(ours.shape[1:]) == tuple(comp.output_shape(shape))
    if isinstance(comp, BatchNorm) and comp.over == "channel":
        theirs = F.batch_norm(x, None, None, training=True, eps=comp.eps)
    else:
        theirs = torch_module([comp]).to(DT)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_avgpool_ceil_mode_truncated_window():
    """AvgPool2d(2, ceil_mode=True) on 5x5: the last window per axis holds one input and
    PyTorch divides it by 1, not k = 4 (the divisor counts only the part inside input + padding),
    so the corner output equals x[4, 4]: ||grad a|| = 1, not sqrt(mu/k) = 1/2."""
    comp, shape, m = AvgPool2d(2, 2, 0, True), (1, 5, 5), 1
    x = torch.zeros((1, 1, 5, 5), dtype=DT)
    x[0, 0, 4, 4] = 1.0
    assert float(reference(comp)(x)[0, 0, 2, 2]) == 1.0  # PyTorch's divisor for the corner is 1
    estimates = nonlinear_estimates(comp, shape, m)
    violations = []
    for mode in MODES:
        declared = comp.constants(shape, m, mode)
        for field in NONLINEAR_FIELDS:
            value, bound = estimates["est"][field], getattr(declared, field)
            if value is not None and value > bound * (1.0 + REL) + ABS:
                violations.append(f"{mode} {field}: estimate {value:.6g} > declared {bound:.6g}")
    assert not violations, (
        "UNSOUND AvgPool2d(kernel_size=2, stride=2, padding=0, ceil_mode=True) on per-example shape "
        "(1, 5, 5), m=1: with ceil_mode the last window is truncated and PyTorch divides by the "
        "truncated window size, so sqrt(mu/k) is not an operator-norm bound: " + "; ".join(violations)
    )


def test_one_sided_jacobians_at_zero_reach_the_convention():
    """ReLU and max pooling are not differentiable at 0: the declared ||grad a(0)|| bounds every
    one-sided Jacobian there and is attained (input position shared by mu windows)."""
    for comp, shape in ((ReLU(), (3,)), (MaxPool2d(3, 1), (1, 5, 5)), (MaxPool2d(3, 2, 1), (1, 5, 5))):
        est = nonlinear_estimates(comp, shape, 1)["est"]
        declared = comp.constants(shape, 1, "tight").jacobian_at_zero
        assert est["jacobian_at_zero"] == pytest.approx(declared, rel=1e-9)
    # positive homogeneity: a(e_i) for the most shared position has norm sqrt(mu)
    comp = MaxPool2d(3, 1)
    e = torch.zeros((1, 1, 5, 5), dtype=DT)
    e[0, 0, 2, 2] = 1.0
    assert float(reference(comp)(e).norm()) == pytest.approx(math.sqrt(comp.multiplicity((1, 5, 5))))


# ---- random shapes (hypothesis)

ELEMENTWISE = (ReLU(), Softplus(), Softplus(0.5), Sigmoid(), Tanh(), Softmax())


@settings(deadline=None, max_examples=4, derandomize=True)
@given(kind=st.sampled_from(range(len(ELEMENTWISE))), shape=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       m=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_random_shapes_activations(kind, shape, m, seed):
    comp, shape = ELEMENTWISE[kind], tuple(shape)
    estimates = nonlinear_estimates(comp, shape, m, seed)
    for mode in MODES:
        check_constants(comp.constants(shape, m, mode), estimates, NONLINEAR_FIELDS,
                        f"{comp!r} shape={shape} m={m} seed={seed}", ("value_at_zero",), None, mode)


@settings(deadline=None, max_examples=4, derandomize=True)
@given(d=st.integers(1, 3), m=st.integers(2, 4), eps=st.sampled_from([1e-3, 0.05, 1.0, 7.0]),
       over=st.sampled_from(["entry", "channel"]), seed=st.integers(0, 10**6))
def test_random_batchnorm(d, m, eps, over, seed):
    comp = BatchNorm(eps, over)
    shape = (d,) if over == "entry" else (d, 1, 2)
    estimates = nonlinear_estimates(comp, shape, m, seed)
    for mode in MODES:
        check_constants(comp.constants(shape, m, mode), estimates, NONLINEAR_FIELDS,
                        f"{comp!r} shape={shape} m={m} seed={seed}", Z0, None, mode)


_pool_configs = st.tuples(
    st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans(), st.integers(3, 6), st.integers(3, 6)
)


@settings(deadline=None, max_examples=12, derandomize=True)
@given(cfg=_pool_configs)
def test_random_pools(cfg):
    """Max and average pooling (any ceil_mode, truncated last windows included) on random windows."""
    k, s, p, ceil, H, W = cfg
    assume(2 * p <= k)  # PyTorch's limit on padding
    shape = (1, H, W)
    for comp in (MaxPool2d(k, s, p, ceil), AvgPool2d(k, s, p, ceil)):
        fn = reference(comp)
        x = _randn((1,) + shape, _gen(H * 7 + W))
        assert tuple(fn(x).shape[1:]) == comp.output_shape(shape)
        estimates = nonlinear_estimates(comp, shape, 1)
        for mode in MODES:
            check_constants(comp.constants(shape, 1, mode), estimates, NONLINEAR_FIELDS, f"{comp!r} shape={shape}",
                            ("value_at_zero",), None, mode)
        if isinstance(comp, MaxPool2d):  # l = ||grad a(0)|| = sqrt(mu) is attained
            assert estimates["est"]["lipschitz"] == pytest.approx(math.sqrt(comp.multiplicity(shape)), rel=1e-9)


# ---- matrix-free estimators agree with the dense ones


@pytest.mark.parametrize(
    "comp, shape, m",
    [pytest.param(Sigmoid(), (3,), 2, id="sigmoid"), pytest.param(Softmax(), (3,), 2, id="softmax"),
     pytest.param(BatchNorm(0.1), (2,), 3, id="bn-entry")],
)
def test_matrix_free_estimators_agree_with_dense(comp, shape, m):
    """jvp/vjp power iterations agree with the dense Jacobian and second-derivative tensor."""
    fn, gen = reference(comp), _gen(3)
    full = (m,) + shape
    if isinstance(comp, BatchNorm):
        x = _bn_point(_randn(full, gen), comp, 0.25)
        start = torch.zeros_like(x)  # x restricted to one normalisation group: the top direction
        start[:, 0] = x[:, 0]  # there (docs); x itself is a saddle of the block-diagonal problem
    else:
        x = (SIGMOID_PEAK * torch.ones(full, dtype=DT)) if isinstance(comp, Sigmoid) else _randn(full, gen)
        start = None
    T = batched_second_derivatives(fn, x[None])[0]
    u, v = _randn(full, gen), _randn(full, gen)
    torch.testing.assert_close(second_directional(fn, x, u, v).reshape(-1),
                               torch.einsum("oij,i,j->o", T, u.reshape(-1), v.reshape(-1)), rtol=1e-9, atol=1e-12)
    dense_l = spectral_norm(dense_jacobian(fn, x))
    dense_L = tensor_norm(T, restarts=4)
    assert jacobian_norm_power(fn, x, gen) == pytest.approx(dense_l, rel=1e-6)
    starts = (start,) if start is not None else (None, None)
    power_L = max(hessian_norm_power(fn, x, gen, iters=30, start=w) for w in starts)
    # both are ascent methods that may stop at different local maxima (softmax: 0.1735 vs 0.1777)
    assert power_L == pytest.approx(dense_L, rel=5e-2)
    if isinstance(comp, BatchNorm):  # ||grad^2|| at c = 1/4 is exactly 48 sqrt5/125 m^-1/2 eps^-1
        m_eff = _bn_groups(comp, shape, m)
        assert dense_L == pytest.approx(BN_TRUE_PEAK / (math.sqrt(m_eff) * comp.eps), rel=1e-6)
        assert power_L == pytest.approx(dense_L, rel=1e-6)


# =============================================================================== bi-affine parts


def bilinear_maps(comp, shape, m):
    """(beta, beta_v, weight shape, bias shape) of a bi-affine component on a batch of m
    (RH eq. 6: b(v, z) = beta(v, z) + beta^v(v), here beta^z = 0 and beta^0 = 0)."""
    out_full = (m,) + tuple(comp.output_shape(shape))
    if isinstance(comp, Linear):
        v_shape, b_shape = (comp.out_features, comp.in_features), (comp.out_features,)
        return (lambda W, Z: Z @ W.T), (lambda b: b.expand(out_full)), v_shape, b_shape
    if isinstance(comp, Conv2d):
        v_shape = (comp.out_channels, comp.in_channels) + comp.kernel_size
        b_shape = (comp.out_channels,)
        beta = lambda W, Z: F.conv2d(Z, W, None, comp.stride, comp.padding, comp.dilation)  # noqa: E731
        return beta, (lambda b: b.view(-1, 1, 1).expand(out_full)), v_shape, b_shape
    if isinstance(comp, ChannelAffine):
        view = (comp.channels,) + (1,) * (len(shape) - 1)
        return (lambda g, Z: g.view(view) * Z), (lambda b: b.view(view).expand(out_full)), (comp.channels,), (
            comp.channels,)
    raise TypeError(comp)


@functools.lru_cache(maxsize=None)
def bilinear_estimates(comp, shape: tuple, m: int, power: bool = True) -> dict:
    """Estimates of (L_beta, l_beta^v, l_beta^z, ||beta^0||): L_beta from the dense tensor B and
    (``power``) by alternating power iteration from the constant ("box") start."""
    beta, beta_v, v_shape, b_shape = bilinear_maps(comp, shape, m)
    gen = _gen(0)
    z_shape = (m,) + shape
    z0 = _randn(z_shape, gen)
    nv, nz = math.prod(v_shape), math.prod(z_shape)
    # B[o, i, j] = beta(e_i, e_j)_o on the canonical bases (forward evaluations only)
    Ev, Ez = torch.eye(nv, dtype=DT).reshape((nv,) + v_shape), torch.eye(nz, dtype=DT).reshape((nz,) + z_shape)
    B = vmap(vmap(beta, in_dims=(None, 0)), in_dims=(0, None))(Ev, Ez).reshape(nv, nz, -1).permute(2, 0, 1)
    box = beta(torch.ones(v_shape, dtype=DT), torch.ones(z_shape, dtype=DT)).reshape(-1)
    dense = tensor_norm(B, restarts=3, starts=[box])
    power = bilinear_power(beta, v_shape, z_shape, gen, iters=30, starts=[
        (torch.ones(v_shape, dtype=DT), torch.ones(z_shape, dtype=DT))]) if power else 0.0
    lv = spectral_norm(dense_jacobian(beta_v, torch.zeros(b_shape, dtype=DT))) if comp.bias else 0.0
    # the whole layer at zero weights is 0 for every z: beta^z = 0 and beta^0 = 0
    zero_layer = float(beta(torch.zeros(v_shape, dtype=DT), z0).norm()
                       + beta_v(torch.zeros(b_shape, dtype=DT)).norm())
    est = {"smoothness": max(dense, power), "weight_lipschitz": lv, "input_lipschitz": zero_layer,
           "offset_norm": zero_layer}
    where = {"smoothness": f"dense {dense:.6g} / power {power:.6g}", "weight_lipschitz": "bias map",
             "input_lipschitz": "layer at v = 0", "offset_norm": "layer at v = 0"}
    return {"est": est, "where": where, "dense": dense, "power": power}


EXACT_BILINEAR = ("weight_lipschitz", "input_lipschitz", "offset_norm")
BILINEAR_CASES = [
    _case(Linear(4, 3), (4,), 2, ("smoothness",) + EXACT_BILINEAR, {"smoothness": 0.999999}),
    _case(Linear(3, 2, bias=False), (2, 3), 2, ("smoothness",) + EXACT_BILINEAR, {"smoothness": 0.999999}),
    _case(Linear(5, 1), (5,), 1, ("smoothness",) + EXACT_BILINEAR, {"smoothness": 0.999999}),
    _case(ChannelAffine(3), (3,), 2, ("smoothness",) + EXACT_BILINEAR, {"smoothness": 0.999999}),
    _case(ChannelAffine(2, bias=False), (2, 3, 3), 2, ("smoothness",) + EXACT_BILINEAR, {"smoothness": 0.999999}),
    _case(Conv2d(1, 1, 3, padding=1), (1, 8, 8), 1, EXACT_BILINEAR, {"smoothness": 0.85}, "conv3x3p1-8x8"),
    _case(Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 5), 2, EXACT_BILINEAR, {"smoothness": 0.6}, "conv3x3s2p1"),
    _case(Conv2d(1, 2, 3, dilation=2), (1, 6, 6), 1, EXACT_BILINEAR, {"smoothness": 0.5}, "conv3x3d2"),
    _case(Conv2d(2, 2, 2), (2, 4, 4), 2, EXACT_BILINEAR, {"smoothness": 0.75}, "conv2x2-overlap"),
    _case(Conv2d(1, 1, (2, 3), stride=(1, 2), padding=(1, 0), bias=False), (1, 5, 6), 2, EXACT_BILINEAR,
          {"smoothness": 0.6}, "conv2x3s1x2p1x0-nobias"),
    _case(Conv2d(1, 2, 3, stride=3), (1, 6, 6), 1, ("smoothness",) + EXACT_BILINEAR, {"smoothness": 0.999999},
          "conv3x3s3-no-overlap"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("comp, shape, m, exact, reach", BILINEAR_CASES)
def test_bilinear_constants_are_sound(comp, shape, m, exact, reach, mode):
    declared = comp.constants(shape, m, mode)
    exact = tuple(f for f in exact if not (f == "smoothness" and mode == "paper" and isinstance(comp, Conv2d)))
    check_constants(declared, bilinear_estimates(comp, shape, m), BILINEAR_FIELDS,
                    f"{comp!r} shape={shape} m={m}", exact, reach, mode)


@pytest.mark.parametrize("comp, shape, m, exact, reach", BILINEAR_CASES)
def test_bilinear_decomposition_is_the_library_layer(comp, shape, m, exact, reach):
    """beta(v, z) + beta^v(b) is the layer itself (nn.Linear / nn.Conv2d from torch_module)."""
    beta, beta_v, v_shape, b_shape = bilinear_maps(comp, shape, m)
    gen = _gen(5)
    W, b, Z = _randn(v_shape, gen), _randn(b_shape, gen), _randn((m,) + shape, gen)
    ours = beta(W, Z) + (beta_v(b) if comp.bias else 0.0)
    assert tuple(ours.shape[1:]) == tuple(comp.output_shape(shape))
    if isinstance(comp, ChannelAffine):
        return  # no stand-alone module: y = gamma (.) z + beta by definition
    layer = torch_module([comp]).to(DT)
    with torch.no_grad():
        layer[0].weight.copy_(W)
        if comp.bias:
            layer[0].bias.copy_(b)
    torch.testing.assert_close(ours, layer(Z), rtol=1e-10, atol=1e-12)
    # the dense tensor and the matrix-free power iteration find the same L_beta
    est = bilinear_estimates(comp, shape, m)
    assert est["power"] == pytest.approx(est["dense"], rel=2e-2)


def test_tight_conv_is_much_smaller_than_paper_on_8x8():
    """3x3 convolution, padding 1, on 8x8: paper sqrt(n_p) = 8, tight sqrt(mu) = 3, and the true
    L_beta (estimated) is close to 3."""
    comp, shape = Conv2d(1, 1, 3, padding=1), (1, 8, 8)
    paper, tight = (comp.constants(shape, 1, mode).smoothness for mode in MODES)
    assert paper == pytest.approx(8.0) and tight == pytest.approx(3.0)
    est = bilinear_estimates(comp, shape, 1)["est"]["smoothness"]
    assert 0.85 * tight <= est <= tight * (1 + REL)
    assert tight <= paper / 2


def test_larger_conv_by_matrix_free_power_iteration():
    """A conv too large for comfort densely: alternating power iteration alone, from the box start."""
    comp, shape, m = Conv2d(2, 3, 3, padding=1), (2, 10, 10), 2
    beta, _, v_shape, _ = bilinear_maps(comp, shape, m)
    est = bilinear_power(beta, v_shape, (m,) + shape, _gen(0),
                         starts=[(torch.ones(v_shape, dtype=DT), torch.ones((m,) + shape, dtype=DT))])
    tight = comp.constants(shape, m, "tight").smoothness
    assert tight == pytest.approx(3.0)
    assert 0.85 * tight <= est <= tight * (1 + REL)


_conv_configs = st.tuples(
    st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
    st.integers(0, 2), st.integers(1, 2), st.integers(3, 6), st.integers(3, 6), st.integers(1, 2),
)


@settings(deadline=None, max_examples=6, derandomize=True)
@given(cfg=_conv_configs)
def test_random_conv_bilinear_constants(cfg):
    cin, cout, kh, kw, s, p, d, H, W, m = cfg
    assume(H + 2 * p >= d * (kh - 1) + 1 and W + 2 * p >= d * (kw - 1) + 1)
    comp, shape = Conv2d(cin, cout, (kh, kw), s, p, d), (cin, H, W)
    estimates = bilinear_estimates(comp, shape, m, power=False)
    for mode in MODES:
        check_constants(comp.constants(shape, m, mode), estimates, BILINEAR_FIELDS, f"{comp!r} shape={shape} m={m}",
                        EXACT_BILINEAR, None, mode)


# ---- patch multiplicity by brute force


def _unfold_counts(size, k, s, p, d):
    """Windows reading each input position, from the dense 0/1 patch-extraction matrix of
    F.unfold applied to the identity basis (the slow way)."""
    basis = torch.eye(size, dtype=DT).reshape(size, 1, 1, size)
    P = F.unfold(basis, kernel_size=(1, k), dilation=(1, d), padding=(0, p), stride=(1, s))  # (size, k, n_out)
    assert set(P.unique().tolist()) <= {0.0, 1.0}
    return P.sum(dim=(1, 2)), P.shape[-1]


def _pool_counts(size, k, s, p, ceil):
    """Windows reading each input position for a pooling window rule with ceil_mode, from the
    non-zero pattern of the dense average-pooling matrix on the identity basis."""
    basis = torch.eye(size, dtype=DT).reshape(size, 1, 1, size)
    A = F.avg_pool2d(basis, (1, k), (1, s), (0, p), ceil_mode=ceil, count_include_pad=True)
    return (A != 0).sum(dim=(1, 2, 3)), A.shape[-1]


@settings(deadline=None, max_examples=80, derandomize=True)
@given(size=st.integers(1, 12), k=st.integers(1, 5), s=st.integers(1, 4), p=st.integers(0, 3), d=st.integers(1, 3))
def test_multiplicity_1d_by_brute_force(size, k, s, p, d):
    assume(size + 2 * p >= d * (k - 1) + 1)
    counts, n_out = _unfold_counts(size, k, s, p, d)
    assert _window_out(size, k, s, p, d) == n_out
    assert _multiplicity_1d(size, k, s, p, d, n_out) == int(counts.max())


@settings(deadline=None, max_examples=60, derandomize=True)
@given(size=st.integers(1, 12), k=st.integers(1, 5), s=st.integers(1, 4), p=st.integers(0, 2), ceil=st.booleans())
def test_pool_multiplicity_1d_by_brute_force(size, k, s, p, ceil):
    assume(2 * p <= k and size + 2 * p >= k)
    counts, n_out = _pool_counts(size, k, s, p, ceil)
    assert _window_out(size, k, s, p, 1, ceil) == n_out
    assert _multiplicity_1d(size, k, s, p, 1, n_out) == int(counts.max())


@pytest.mark.parametrize(
    "comp, shape",
    [pytest.param(Conv2d(1, 1, 3, padding=1), (1, 8, 8), id="conv3p1"),
     pytest.param(Conv2d(1, 1, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (1, 7, 6), id="conv-mixed"),
     pytest.param(MaxPool2d(3, 2, 1, True), (1, 6, 7), id="maxpool-ceil")],
)
def test_multiplicity_2d_by_brute_force(comp, shape):
    H, W = shape[1:]
    basis = torch.eye(H * W, dtype=DT).reshape(H * W, 1, H, W)
    if isinstance(comp, Conv2d):
        P = F.unfold(basis, comp.kernel_size, comp.dilation, comp.padding, comp.stride)
        counts = P.sum(dim=(1, 2))
    else:
        A = F.avg_pool2d(basis, comp.kernel_size, comp.stride, comp.padding, ceil_mode=comp.ceil_mode)
        counts = (A != 0).sum(dim=(1, 2, 3))
    assert comp.multiplicity(shape) == int(counts.max())


# =============================================================================== losses


def _ce(Yhat, T):
    return -(T * torch.log_softmax(Yhat, dim=-1)).sum(-1).mean()


def _sq(Yhat, T):
    return 0.5 * ((Yhat - T) ** 2).sum(-1).mean()


def _loss_points(kind, n, q, gen, output_bound=1.0, target_norm=1.0):
    """(Yhat, targets) pairs: random, and adversarial for the gradient and the Hessian."""
    pts = []
    if kind == "cross-entropy":
        labels = torch.randint(0, q, (n,), generator=gen)
        onehot = F.one_hot(labels, q).to(DT)
        soft = torch.softmax(_randn((n, q), gen, 2.0), dim=-1)
        for s in (0.1, 1.0, 5.0, 50.0):
            pts += [(_randn((n, q), gen, s), onehot), (_randn((n, q), gen, s), soft)]
        wrong = torch.full((n, q), 0.0, dtype=DT)
        wrong[torch.arange(n), (labels + 1) % q] = 60.0  # p = one-hot on a wrong class: ||p - y||^2 -> 2
        tie = torch.full((n, q), -60.0, dtype=DT)
        tie[:, :2] = 0.0  # p = (1/2, 1/2, 0...): ||diag p - p p^T|| = 1/2
        pts += [(wrong, onehot), (tie, onehot), (torch.zeros((n, q), dtype=DT), onehot)]
    else:
        for s in (0.2, 1.0):
            T = _randn((n, q), gen)
            T = target_norm * s * T / T.norm(dim=-1, keepdim=True)  # ||y_i|| <= rho_Y
            Y = _randn((n, q), gen)
            pts.append((output_bound * s * Y / Y.norm(), T))  # ||Yhat||_F <= rho_C
        T = _randn((n, q), gen)
        T = target_norm * T / T.norm(dim=-1, keepdim=True)
        pts.append((-output_bound * T / T.norm(), T))  # ||Yhat - Y|| = rho_C + sqrt(n) rho_Y
    return pts


@functools.lru_cache(maxsize=None)
def loss_estimates(kind, n, q, output_bound=1.0, target_norm=1.0) -> dict:
    f = _ce if kind == "cross-entropy" else _sq
    gen = _gen(11)
    est = {"lipschitz": 0.0, "smoothness": 0.0}
    where = {"lipschitz": "", "smoothness": ""}
    for i, (Yhat, T) in enumerate(_loss_points(kind, n, q, gen, output_bound, target_norm)):
        g = jacrev(f)(Yhat, T)
        H = torch.func.hessian(f)(Yhat, T).reshape(n * q, n * q)
        for field, value in (("lipschitz", float(g.norm())), ("smoothness", spectral_norm(H))):
            if value > est[field]:
                est[field], where[field] = value, f"point {i}"
    return {"est": est, "where": where}


LOSS_CASES = [
    pytest.param("cross-entropy", 1, 2, {}, id="ce-n1-q2"),
    pytest.param("cross-entropy", 3, 4, {}, id="ce-n3-q4"),
    pytest.param("cross-entropy", 4, 3, {}, id="ce-n4-q3"),
    pytest.param("square", 1, 3, {"output_bound": 2.0, "target_norm": 0.7}, id="square-n1"),
    pytest.param("square", 4, 3, {"output_bound": 2.0, "target_norm": 0.7}, id="square-n4"),
    pytest.param("autoencoder", 3, 2, {"output_bound": 1.5, "input_norm": 1.3}, id="autoencoder-n3"),
]


def _loss_declared(kind, n, params, mode):
    return objective.loss_constants(kind, batch_size=n, output_bound=params.get("output_bound", 1.0), mode=mode,
                                    **{k: v for k, v in params.items() if k != "output_bound"})


def _loss_est(kind, n, q, params):
    target = params.get("target_norm", params.get("input_norm", 1.0))
    return loss_estimates("cross-entropy" if kind == "cross-entropy" else "square", n, q,
                          params.get("output_bound", 1.0), target)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind, n, q, params", LOSS_CASES)
def test_loss_constants_are_sound(kind, n, q, params, mode):
    declared = _loss_declared(kind, n, params, mode)
    check_constants(declared, _loss_est(kind, n, q, params), ("lipschitz", "smoothness"), f"{kind} n={n} q={q}",
                    (), {"lipschitz": 0.999999, "smoothness": 0.999999}, mode)
    if mode == "tight" and kind != "cross-entropy":  # exact at the adversarial point
        assert _loss_est(kind, n, q, params)["est"]["lipschitz"] == pytest.approx(declared.lipschitz, rel=1e-9)


def _convex_clustering_gradient(yhat: np.ndarray, iters: int = 2000) -> np.ndarray:
    """grad of f(yhat) = min_y 1/2 ||y - yhat||^2 + sum_{i<j} ||y_i - y_j|| (RH eq. 25):
    yhat - prox(yhat) = D^T u* with u* = argmin_{||u_ij|| <= 1} 1/2 ||D^T u - yhat||^2 (FISTA on
    the dual; D is the pair-difference operator, ||D||^2 = n)."""
    n, _ = yhat.shape
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    D = np.zeros((len(pairs), n))
    for r, (i, j) in enumerate(pairs):
        D[r, i], D[r, j] = 1.0, -1.0
    u = np.zeros((len(pairs), yhat.shape[1]))
    y, t = u.copy(), 1.0
    for _ in range(iters):
        new = y - D @ (D.T @ y - yhat) / n
        new /= np.maximum(1.0, np.linalg.norm(new, axis=1, keepdims=True))
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = new + (t - 1) / t_new * (new - u)
        u, t = new, t_new
    return D.T @ u


def _simplex(n: int) -> np.ndarray:
    """The n vertices of a regular simplex with unit edges, in R^(n-1), centred at 0."""
    Q, _ = np.linalg.qr(np.eye(n) - 1.0 / n)  # first n-1 columns: a basis of 1-perp
    return (np.eye(n) - 1.0 / n) @ Q[:, : n - 1] / math.sqrt(2.0)


@functools.lru_cache(maxsize=None)
def convex_clustering_estimates(n: int):
    """(max ||grad f||, max ||grad f(a) - grad f(b)|| / ||a - b||) over random and adversarial
    points; the far-apart regular simplex attains sup ||grad f|| = n sqrt((n-1)/2) (docs)."""
    q = max(2, n - 1)
    rng = np.random.default_rng(n)
    pts = [rng.normal(size=(n, q)) * s for s in (0.1, 1.0, 3.0, 1e3)]
    line = np.zeros((n, q))
    line[:, 0] = 1e3 * np.arange(n)  # separated points on a line: grad_i = (2i - n + 1) e_1 (up to sign)
    simplex = np.zeros((n, q))
    simplex[:, : n - 1] = 1e3 * _simplex(n)  # every u_ij a unit vector along y_i - y_j
    pts += [line, simplex]
    grads = [_convex_clustering_gradient(y) for y in pts]
    lip = max(float(np.linalg.norm(g)) for g in grads)
    smooth = max(float(np.linalg.norm(ga - gb) / np.linalg.norm(a - b))
                 for a, ga in zip(pts, grads) for b, gb in zip(pts, grads) if a is not b)
    return lip, smooth


@pytest.mark.parametrize("n", [1, 3, 4, 5])
@pytest.mark.parametrize("mode", MODES)
def test_convex_clustering_constants_are_sound(n, mode):
    declared = objective.loss_constants("convex-clustering", batch_size=n, output_bound=1.0, mode=mode)
    if n == 1:  # no pair: f(yhat) = 0
        assert declared.lipschitz == 0.0
        return
    lip, smooth = convex_clustering_estimates(n)
    assert lip <= declared.lipschitz * (1 + REL), f"UNSOUND convex-clustering n={n} [{mode}]: l {lip} > {declared}"
    assert lip == pytest.approx(n * math.sqrt((n - 1) / 2), rel=1e-6)  # the simplex attains the sup
    assert smooth <= declared.smoothness * (1 + 1e-6), f"UNSOUND convex-clustering n={n} [{mode}]: L {smooth}"


def test_convex_clustering_two_points():
    """n = 2: f(yhat) = min_y 1/2 ||y - yhat||^2 + ||y_1 - y_2||; for ||yhat_1 - yhat_2|| > 2,
    grad f = (u, -u) with u = (yhat_1 - yhat_2)/||yhat_1 - yhat_2||, so ||grad f|| = sqrt 2."""
    lip, _ = convex_clustering_estimates(2)
    yhat = np.array([[5.0, 0.0], [0.0, 0.0]])
    assert np.allclose(_convex_clustering_gradient(yhat), [[1.0, 0.0], [-1.0, 0.0]], atol=1e-9)
    assert lip == pytest.approx(math.sqrt(2.0), rel=1e-9)
    violations = [
        f"{mode}: l estimate {lip:.6g} > declared {c.lipschitz:.6g}"
        for mode in MODES
        for c in [objective.loss_constants("convex-clustering", batch_size=2, output_bound=1.0, mode=mode)]
        if lip > c.lipschitz * (1 + REL)
    ]
    assert not violations, (
        "UNSOUND convex-clustering loss with batch size n = 2: yhat = two points more than 2 apart "
        "gives ||grad f|| = sqrt 2 > n(n-1)/2 = 1 (RH Prop. B.1 drops the factor sqrt 2 of "
        "||y_i - y_j|| <= sqrt 2 ||y||; tight mode inherits it through the min): " + "; ".join(violations)
    )


# =============================================================================== strength


def _halve(monkeypatch, target, field):
    """Monkeypatch ``target`` (a component class or the loss_constants function) so that the
    constant ``field`` is halved."""
    if target == "loss":
        orig = objective.loss_constants
        monkeypatch.setattr(objective, "loss_constants", lambda *a, **k: dataclasses.replace(
            orig(*a, **k), **{field: getattr(orig(*a, **k), field) / 2}))
        return
    orig = target.constants

    def patched(self, shape, batch_size, mode):
        c = orig(self, shape, batch_size, mode)
        return dataclasses.replace(c, **{field: getattr(c, field) / 2})

    monkeypatch.setattr(target, "constants", patched)


MUTATIONS = [
    (Sigmoid(), (3,), 2, "smoothness"),
    (Sigmoid(), (3,), 2, "lipschitz"),
    (Sigmoid(), (3,), 2, "bound"),
    (Tanh(), (4,), 1, "smoothness"),
    (Softplus(), (5,), 1, "smoothness"),
    (Softplus(), (5,), 1, "value_at_zero"),
    (Softmax(), (4,), 2, "lipschitz"),
    (Softmax(), (4,), 2, "bound"),
    (MaxPool2d(3, 1), (1, 5, 5), 1, "lipschitz"),
    (AvgPool2d(2), (1, 4, 4), 2, "lipschitz"),
    (BatchNorm(1e-2), (3,), 2, "smoothness"),
    (BatchNorm(1e-2), (3,), 2, "lipschitz"),
    (BatchNorm(1e-2), (3,), 2, "bound"),
    (BatchNorm(0.1, "channel"), (2, 2, 2), 2, "smoothness"),
    (Conv2d(1, 1, 3, padding=1), (1, 8, 8), 1, "smoothness"),
    (Conv2d(2, 3, 3, stride=2, padding=1), (2, 5, 5), 2, "weight_lipschitz"),
    (Linear(4, 3), (4,), 2, "smoothness"),
    (ChannelAffine(3), (3,), 2, "weight_lipschitz"),
    ("cross-entropy", 3, 4, "lipschitz"),
    ("cross-entropy", 3, 4, "smoothness"),
    ("square", 4, 3, "lipschitz"),
    ("square", 4, 3, "smoothness"),
]


@pytest.mark.parametrize(
    "target, shape, m, field",
    [pytest.param(*mu, id=f"{mu[0] if isinstance(mu[0], str) else mu[0].label}-{mu[3]}") for mu in MUTATIONS],
)
def test_halved_constant_is_caught(target, shape, m, field, monkeypatch):
    """With one tight constant halved, the soundness check above fails: the estimators are strong."""
    if isinstance(target, str):
        n, q = shape, m
        params = {} if target == "cross-entropy" else {"output_bound": 2.0, "target_norm": 0.7}
        _halve(monkeypatch, "loss", field)
        with pytest.raises(AssertionError, match=f"UNSOUND .*{field}"):
            test_loss_constants_are_sound(target, n, q, params, "tight")
        return
    _halve(monkeypatch, type(target), field)
    if target.role == "bilinear":
        with pytest.raises(AssertionError, match=f"UNSOUND .*{field}"):
            check_constants(target.constants(shape, m, "tight"), bilinear_estimates(target, shape, m),
                            BILINEAR_FIELDS, repr(target))
    else:
        with pytest.raises(AssertionError, match=f"UNSOUND .*{field}"):
            check_constants(target.constants(shape, m, "tight"), nonlinear_estimates(target, shape, m),
                            NONLINEAR_FIELDS, repr(target))


# =============================================================================== scalar facts


def test_batchnorm_factor_is_maximised_at_golden_c():
    """c = (1 + sqrt 5)/4 maximises h(c) = sqrt(c)(2c+1)/(c+1)^(5/2) (RH Prop. B.2 proof), and
    3 h(c*) = BATCHNORM_SMOOTHNESS_FACTOR ~ 1.605.  For c >= 6, h(c) <= 3/c <= 1/2 < h(c*), so
    the grid [0, 50] (refined near the maximiser) covers it."""
    c = np.concatenate([np.linspace(0.0, 50.0, 100_001), np.logspace(-12, 0, 10_001),
                        np.linspace(0.7, 0.9, 200_001)])
    h = np.sqrt(c) * (2 * c + 1) / (c + 1) ** 2.5
    i = int(np.argmax(h))
    assert abs(c[i] - BN_C_GOLDEN) <= 2e-6
    assert 3 * h[i] <= BATCHNORM_SMOOTHNESS_FACTOR * (1 + 1e-12)
    assert 3 * h[i] == pytest.approx(BATCHNORM_SMOOTHNESS_FACTOR, rel=1e-9)
    assert 1.6049 < BATCHNORM_SMOOTHNESS_FACTOR < 1.6051  # the docstring's "1.6051" is an upper bound
    assert 4 * BN_C_GOLDEN**2 - 2 * BN_C_GOLDEN - 1 == pytest.approx(0.0, abs=1e-15)  # (log h)'(c*) = 0
    # the exact norm of the per-group Hessian (docs remark): 3 sqrt(c)/(1+c)^(5/2) for c <= 1/2,
    # 2/(sqrt3 (1+c)) beyond; its maximum 48 sqrt5 / 125 ~ 0.8587 is reached at c = 1/4
    exact = np.where(c <= 0.5, 3 * np.sqrt(c) / (1 + c) ** 2.5, 2 / (math.sqrt(3) * (1 + c)))
    assert exact.max() == pytest.approx(BN_TRUE_PEAK, rel=1e-8)
    assert abs(c[int(np.argmax(exact))] - 0.25) <= 5e-4


def test_scalar_activation_constants_on_a_dense_grid():
    """max |sigma''| = sqrt3/18 (tight) <= 1/10 (paper); max |tanh''| = 4/(3 sqrt3); max sigma' = 1/4."""
    x = torch.linspace(-20, 20, 400_001, dtype=DT)
    s = torch.sigmoid(x)
    d2 = s * (1 - s) * (1 - 2 * s)
    assert float(d2.abs().max()) == pytest.approx(SIGMOID_SMOOTHNESS, rel=1e-8)
    assert SIGMOID_SMOOTHNESS <= 0.1
    assert float(d2.abs().max()) <= SIGMOID_SMOOTHNESS * (1 + 1e-12)
    t = torch.tanh(x)
    assert float((2 * t * (1 - t * t)).abs().max()) == pytest.approx(4 / (3 * math.sqrt(3)), rel=1e-8)
    assert float((s * (1 - s)).max()) == pytest.approx(0.25)


def test_softmax_second_derivative_formula_and_one_norm_bound():
    """d^2 p[u, v]_i = p_i (u~_i v~_i - E_p[u~ v~]) with u~ = u - p^T u, and ||.||_1 <= 1 for unit u, v."""
    gen = _gen(7)
    for k in (2, 3, 5):
        for _ in range(5):
            x, u, v = _randn((k,), gen, 3.0), _unit(_randn((k,), gen)), _unit(_randn((k,), gen))
            p = torch.softmax(x, -1)
            ut, vt = u - p @ u, v - p @ v
            formula = p * (ut * vt - p @ (ut * vt))
            d2 = second_directional(lambda y: torch.softmax(y, -1), x, u, v)
            torch.testing.assert_close(d2, formula, rtol=1e-10, atol=1e-12)
            var_u, var_v = p @ (ut * ut), p @ (vt * vt)
            assert float(formula.abs().sum()) <= 2 * math.sqrt(var_u * var_v) + 1e-12
            assert float(var_u) <= 0.5 + 1e-12 and float(var_v) <= 0.5 + 1e-12
