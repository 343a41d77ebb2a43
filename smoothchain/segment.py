"""Segment certificates: the curvature of F along one step, and the decrease it guarantees.

The descent lemma needs the smoothness of F only on the segment a step travels, and only in the
step's direction.  For the objective F(w) = f(psi(w; x)) + l2/2 ||w||^2 of one batch and a
direction d (the gradient, for gradient descent), let phi(t) = F(w - t d).  Then (Taylor with
integral remainder; docs/segment.md, Prop. 1)

    F(w) - F(w - T d) = -T phi'(0) - int_0^T (T - t) phi''(t) dt
                      >= -T phi'(0) - sum_j S_j int_{a_j}^{b_j} (T - t) dt

for any pieces 0 = a_0 < b_0 = a_1 < ... < b_n = T with S_j >= sup_{[a_j, b_j]} phi''.  Each S_j
is phi''(a_j) -- computed exactly from the jets (z, z', z'') of every layer at w - a_j d, which
forward-mode propagation gives in a few passes -- plus (b_j - a_j) times a bound on |phi'''| over
the piece (docs/segment.md, Prop. 2-4):

    phi''' = D^3 f[z', z', z'] + 3 D^2 f[z', z''] + <grad f, z'''>     (z the network's output)

with sups of ||z^(k)(t)|| over the piece carried layer by layer: exact at a_j, plus the piece's
length times a bound on the next derivative (Taylor again), the third derivative bounded by the
chain rule with the actual weights' operator norms
(:meth:`~smoothchain.components.Component.weight_norms_at`), the direction's, and the sups of
|a'|, |a''|, |a'''| of each activation over the pre-activation ranges reachable on the piece
(:meth:`~smoothchain.components.Elementwise.sups_on`).  As the pieces shrink, S_j tends to
phi''(a_j): the certificate tends to the exact curvature along the step, which no bound over
a ball (every direction, RH Prop. 4.2 / Cor. 4.5; :mod:`.local`) can reach.

Supported: chains of ``nn.Linear`` and ``nn.Conv2d`` (with or without bias), activations that
declare third-derivative facts (tanh, sigmoid, softplus), average pooling, flatten, identity;
losses "cross-entropy" (labels, or probability rows) and "square".  Everything is computed in
float64 on copies; the model is never modified.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import grad as func_grad
from torch.func import jvp

from .chain import ChainError, _mul
from .components import NORM_MARGIN, AdaptiveAvgPool2d, AvgPool2d, Conv2d, Elementwise, Linear
from .functional import flat_parameters, make_functional_call
from .losses import get_loss, loss_function
from .torch_chain import components_from_module

__all__ = ["SegmentBound", "SegmentError", "segment_bound", "certified_segment_step", "SEGMENT_LOSSES"]

#: the losses with third-derivative bounds (docs/segment.md, Prop. 4)
SEGMENT_LOSSES = ("cross-entropy", "square")
#: pieces of the segment: more pieces, a tighter bound (each costs one jet pass)
DEFAULT_PIECES = 8
_LINEAR_MAPS = (AvgPool2d, AdaptiveAvgPool2d)  # linear in their input, no parameters


class SegmentError(ChainError, ValueError):
    """A model, loss or argument that segment certificates do not take (the message says why)."""


@dataclass(frozen=True)
class SegmentBound:
    """The certificate of one step w -> w - T d (docs/segment.md).

    ``slope`` = phi'(0) = -<grad F(w), d> and ``curvature_at_start`` = phi''(0) = d^T grad^2 F(w) d
    (exact, float64); ``pieces``: (a_j, b_j, S_j) with S_j >= sup of phi'' on [a_j, b_j];
    ``curvature_bound`` = max_j S_j; ``guaranteed_decrease`` = -T slope - sum_j S_j
    ((T - a_j)^2 - (T - b_j)^2) / 2 <= F(w) - F(w - T d).
    """

    step: float
    slope: float
    curvature_at_start: float
    pieces: tuple[tuple[float, float, float], ...]
    curvature_bound: float
    guaranteed_decrease: float


# --------------------------------------------------------------------------------------------
# the chain as stages with their parameters
@dataclass
class _Stage:
    kind: str                 # "affine", "elementwise", "linear" (a parameter-free linear map)
    module: nn.Module         # the float64 copy of the leaf
    component: object
    shape: tuple[int, ...]    # per-example input shape
    params: tuple[str, ...] = ()   # "weight"/"bias" names of an affine leaf
    slices: tuple[slice, ...] = ()  # their places in the flat vector
    lipschitz: float = 1.0    # of a linear map

    def __post_init__(self):
        # one functional wrapper per affine leaf, built once (it is called 5 times per piece)
        self.call = make_functional_call(self.module) if self.kind == "affine" else None


def _stages(model: nn.Module, shape: tuple[int, ...], m: int) -> tuple[list[_Stage], tuple[int, ...]]:
    """The model as a list of stages (float64 copies of its leaves), and its per-example output shape."""
    mc = components_from_module(model, shape, m)
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    if len(set(mc.leaf_index)) != len(mc.leaf_index):
        culprit = mc.leaves[mc.leaf_index[0]][0]
        for i in range(1, len(mc.leaf_index)):
            if mc.leaf_index[i] == mc.leaf_index[i - 1]:
                culprit = mc.leaves[mc.leaf_index[i]][0]
        raise SegmentError(f"module {culprit!r} ({type(dict(mc.leaves)[culprit]).__name__}) gives several components; segment "
                           f"certificates take linear, conv, tanh/sigmoid/softplus, average pooling and "
                           f"flatten layers: use CertifiedGD(mode='local') for this model")
    seen: set[int] = set()
    stages = []
    for i, comp in enumerate(mc.components):
        name, leaf = mc.leaves[mc.leaf_index[i]]
        if id(leaf) in seen:
            raise SegmentError(f"module {name!r} is used twice in the chain; segment certificates need "
                               f"each layer's parameters once")
        seen.add(id(leaf))
        copy_ = copy.deepcopy(leaf).double().eval()
        if isinstance(comp, (Linear, Conv2d)):
            pnames = tuple(n for n, _ in leaf.named_parameters(recurse=False))
            full = [f"{name}.{n}" if name else n for n in pnames]
            stages.append(_Stage("affine", copy_, comp, mc.shapes[i], pnames, tuple(offsets[f] for f in full)))
        elif isinstance(comp, Elementwise):
            if comp.d3 is None or comp.d3_peaks is None or math.isinf(comp.facts.d2):
                raise SegmentError(f"module {name!r} ({type(leaf).__name__}) has no bounded third derivative; "
                                   f"segment certificates need a C^3 activation (tanh, sigmoid, softplus)")
            stages.append(_Stage("elementwise", copy_, comp, mc.shapes[i]))
        elif isinstance(comp, _LINEAR_MAPS):
            lip = comp.constants(mc.shapes[i], m, "tight").lipschitz
            stages.append(_Stage("linear", copy_, comp, mc.shapes[i], lipschitz=float(lip)))
        elif comp.role == "shape":
            stages.append(_Stage("linear", copy_, comp, mc.shapes[i]))
        else:
            raise SegmentError(f"module {name!r} ({type(leaf).__name__}) is not supported by segment "
                               f"certificates (linear, conv, tanh/sigmoid/softplus, average pooling, flatten, "
                               f"identity): use CertifiedGD(mode='local') for this model")
        if any(True for _ in leaf.parameters(recurse=False)) and stages[-1].kind != "affine":
            raise SegmentError(f"module {name!r} has parameters but is not a linear or conv layer")
    return stages, tuple(mc.shapes[-1])


# --------------------------------------------------------------------------------------------
# jets: (z, z', z'') of every stage at w - a d, exactly (up to rounding)
@dataclass
class _Jet:
    j0: Tensor
    j1: Tensor
    j2: Tensor


def _affine_call(stage: _Stage, tensors: Sequence[Tensor | None], z: Tensor) -> Tensor:
    named = {n: (t if t is not None else torch.zeros_like(getattr(stage.module, n)))
             for n, t in zip(stage.params, tensors)}
    return stage.call(named, z)


def _jets(stages: list[_Stage], w: Tensor, d: Tensor, a: float, x: Tensor) -> list[tuple[_Jet, _Jet | None]]:
    """For every stage: (the jet of its output, the jet of its pre-activation input for an
    element-wise stage -- None otherwise) at the weights w - a d; t-derivatives along -d."""
    z = _Jet(x, torch.zeros_like(x), torch.zeros_like(x))
    out = []
    for st in stages:
        if st.kind == "affine":
            W = [(w[s] - a * d[s]).reshape(getattr(st.module, n).shape) for n, s in zip(st.params, st.slices)]
            D = [d[s].reshape(getattr(st.module, n).shape) for n, s in zip(st.params, st.slices)]
            no_bias = [t if n == "weight" else None for n, t in zip(st.params, W)]
            D_no_bias = [t if n == "weight" else None for n, t in zip(st.params, D)]
            u0 = _affine_call(st, W, z.j0)
            u1 = _affine_call(st, no_bias, z.j1) - _affine_call(st, D, z.j0)
            u2 = _affine_call(st, no_bias, z.j2) - 2.0 * _affine_call(st, D_no_bias, z.j1)
            z = _Jet(u0, u1, u2)
            out.append((z, None))
        elif st.kind == "elementwise":
            u = z
            a1, a2 = st.component.derivatives(u.j0, 2)
            z = _Jet(st.component.function(u.j0), a1 * u.j1, a2 * u.j1 * u.j1 + a1 * u.j2)
            out.append((z, u))
        else:
            z = _Jet(st.module(z.j0), st.module(z.j1), st.module(z.j2))
            out.append((z, None))
    return out


# --------------------------------------------------------------------------------------------
# sups over a piece of length delta (docs/segment.md, Prop. 3)
def _up(v: float) -> float:
    return v * (1 + NORM_MARGIN)


def _fro(t: Tensor) -> float:
    return _up(float(t.norm()))


@dataclass
class _Sups:
    s: tuple[float, float, float, float]  # sups of ||z||, ||z'||, ||z''||, ||z'''|| over the piece
    inf1: float                           # sup of ||z'||_inf (the largest entry) over the piece
    lo: Tensor                            # every entry of z stays in [lo, hi] over the piece
    hi: Tensor


def _sups(jet: _Jet, crude: tuple[float, float, float], delta: float) -> _Sups:
    """Sups on a piece from the jet at its start and crude bounds (C1, C2, C3) on the sups of
    ||z'||, ||z''||, ||z'''||: each order is at most its value at the start plus delta times the
    next order's sup (mean-value theorem), and at most its crude bound."""
    c1, c2, c3 = crude
    s3 = c3
    s2 = min(c2, _fro(jet.j2) + delta * s3)
    s1 = min(c1, _fro(jet.j1) + delta * s2)
    s0 = _fro(jet.j0) + delta * s1
    per_entry = jet.j1.abs() + delta * s2  # sup |z_i'| on the piece, per entry
    inf1 = min(s1, _up(float(per_entry.max())) if per_entry.numel() else 0.0)
    reach = delta * per_entry * (1 + NORM_MARGIN)
    return _Sups((s0, s1, s2, s3), inf1, jet.j0 - reach, jet.j0 + reach)


def _piece_sups(stages: list[_Stage], jets, w: Tensor, d: Tensor, a: float, delta: float, x: Tensor,
                m: int) -> _Sups:
    """The sups of the output's t-derivatives over [a, a + delta] (docs/segment.md, Prop. 3)."""
    zero = torch.zeros_like(x)
    cur = _sups(_Jet(x, zero, zero), (0.0, 0.0, 0.0), delta)
    for st, (jet, _) in zip(stages, jets):
        s0, s1, s2, s3 = cur.s
        if st.kind == "affine":
            W = {n: (w[s] - a * d[s]).reshape(getattr(st.module, n).shape) for n, s in zip(st.params, st.slices)}
            D = {n: d[s].reshape(getattr(st.module, n).shape) for n, s in zip(st.params, st.slices)}
            nw = st.component.weight_norms_at(W["weight"], W.get("bias"), st.shape, m)
            nd = st.component.weight_norms_at(D["weight"], D.get("bias"), st.shape, m)
            w_op = nw.input_operator + delta * nd.input_operator  # ||W(t)|| on the piece
            d_op, d_off = nd.input_operator, nd.offset
            # u' = W(t) z' - D z - d_b, u'' = W(t) z'' - 2 D z', u''' = W(t) z''' - 3 D z''
            crude = (_mul(w_op, s1) + _mul(d_op, s0) + d_off, _mul(w_op, s2) + 2 * _mul(d_op, s1),
                     _mul(w_op, s3) + 3 * _mul(d_op, s2))
            cur = _sups(jet, crude, delta)
        elif st.kind == "elementwise":
            a1, a2, a3 = st.component.sups_on(cur.lo, cur.hi)
            p1 = cur.inf1
            # z' = a' u', z'' = a'' u'^2 + a' u'', z''' = a''' u'^3 + 3 a'' u' u'' + a' u'''
            crude = (_mul(a1, s1), _mul(a2, _mul(p1, s1)) + _mul(a1, s2),
                     _mul(a3, _mul(p1 * p1, s1)) + 3 * _mul(a2, _mul(p1, s2)) + _mul(a1, s3))
            cur = _sups(jet, crude, delta)
        else:
            lip = st.lipschitz
            cur = _sups(jet, (_mul(lip, s1), _mul(lip, s2), _mul(lip, s3)), delta)
    return cur


# --------------------------------------------------------------------------------------------
# the loss: its exact derivatives along the output jet, and its global constants
def _loss_constants(loss: str, y, m: int) -> tuple[float, float]:
    """(c2, c3): ||D^2 f|| <= c2 and |D^3 f[v, v, v]| <= c3 ||v||^3 for every output (docs/segment.md,
    Prop. 4): cross-entropy s/(2m) and s/(sqrt(2) m) with s the largest target row sum (1 for labels);
    square 1/m and 0."""
    if loss == "square":
        return 1.0 / m, 0.0
    s = 1.0
    if y.is_floating_point():
        if bool((y < 0).any()):
            raise SegmentError("cross-entropy with soft targets needs non-negative target rows")
        s = float(y.reshape(m, -1).sum(dim=1).max())
    return _up(s / (2.0 * m)), _up(s / (math.sqrt(2.0) * m))


def _output_terms(f, z: _Jet) -> tuple[float, float, float]:
    """(<grad f, z'>, D^2 f[z', z'] + <grad f, z''>, ||grad f||) at the output jet (exact)."""
    g_f = func_grad(f)
    g, hz1 = jvp(g_f, (z.j0,), (z.j1,))
    first = float((g * z.j1).sum())
    second = float((hz1 * z.j1).sum() + (g * z.j2).sum())
    return first, second, float(g.norm())


# --------------------------------------------------------------------------------------------
def _check(model, x, y, direction, loss: str, l2: float, pieces: int):
    if not isinstance(model, nn.Module):
        raise SegmentError(f"expected an nn.Module, got {type(model).__name__}")
    if loss not in SEGMENT_LOSSES:
        raise SegmentError(f"segment certificates take the losses {', '.join(SEGMENT_LOSSES)}, got {loss!r}")
    get_loss(loss)
    if not isinstance(x, Tensor) or x.dim() < 2 or len(x) == 0:
        raise SegmentError("x must be a non-empty batch tensor (m, ...)")
    if not bool(torch.isfinite(x).all()):
        raise SegmentError("the input batch x has NaN or infinite entries")
    if not isinstance(y, Tensor) or len(y) != len(x):
        raise SegmentError("y must be a tensor of targets, one per example of x")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise SegmentError("the targets y have NaN or infinite entries")
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
        raise SegmentError(f"l2 must be a finite number >= 0, got {l2!r}")
    if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
        raise SegmentError(f"pieces must be a positive integer, got {pieces!r}")
    w = (flat_parameters(model).double() if any(True for _ in model.parameters())
         else torch.zeros(0, dtype=torch.float64))
    if not isinstance(direction, Tensor) or direction.dim() != 1 or direction.numel() != w.numel():
        got = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise SegmentError(f"direction must be a flat vector of the model's {w.numel()} parameters "
                           f"(named_parameters() order), got {got}")
    d = direction.detach().double()
    if not bool(torch.isfinite(d).all()):
        raise SegmentError("the direction has NaN or infinite entries")
    return w, d


class _Problem:
    """One batch, one model, one direction: jets and piece bounds on demand."""

    def __init__(self, model, x, y, direction, loss, l2, pieces):
        self.w, self.d = _check(model, x, y, direction, loss, l2, pieces)
        self.x = x.detach().double()
        self.m = int(x.shape[0])
        self.stages, out_shape = _stages(model, tuple(x.shape[1:]), self.m)
        if y.is_floating_point():
            self.y = y.detach().double()
        else:  # labels, checked here for a clear message (the loss table scatters them)
            if len(out_shape) != 1:
                raise SegmentError(f"cross-entropy with labels needs outputs of shape (classes,), the model "
                                   f"gives {out_shape}")
            logits = int(out_shape[0])
            if bool((y < 0).any()) or bool((y >= logits).any()):
                raise SegmentError(f"labels y must lie in 0..{logits - 1} (the model has {logits} outputs)")
            self.y = y.detach().long()
        self.loss, self.l2, self.pieces = loss, float(l2), pieces
        self.f = loss_function(loss, self.y, self.x)
        self.c2, self.c3 = _loss_constants(loss, self.y, self.m)
        self.dd = float(self.d.dot(self.d))
        self._at: dict[float, tuple] = {}

    def at(self, a: float):
        """(jets, phi'(a), phi''(a), ||grad f||) at w - a d."""
        if a not in self._at:
            with torch.no_grad():
                jets = _jets(self.stages, self.w, self.d, a, self.x)
            first, second, gnorm = _output_terms(self.f, jets[-1][0])
            wa = self.w - a * self.d
            slope = first - self.l2 * float(wa.dot(self.d))
            curv = second + self.l2 * self.dd
            self._at[a] = (jets, slope, curv, gnorm)
        return self._at[a]

    def bound(self, T: float) -> SegmentBound:
        n = self.pieces
        edges = [T * j / n for j in range(n)] + [T]
        slope0, curv0 = self.at(0.0)[1:3]
        rows, loss_part = [], 0.0
        for a, b in zip(edges[:-1], edges[1:]):
            jets, _, curv, gnorm = self.at(a)
            delta = b - a
            with torch.no_grad():
                s = _piece_sups(self.stages, jets, self.w, self.d, a, delta, self.x, self.m)
            _, s1, s2, s3 = s.s
            c1 = _up(gnorm) + delta * self.c2 * s1  # sup of ||grad f|| on the piece
            third = self.c3 * s1 ** 3 + 3 * self.c2 * s1 * s2 + _mul(c1, s3)
            S = curv + delta * third
            S = S + abs(S) * 1e-12 + 1e-300  # rounding of the float64 jets
            if math.isnan(S):  # an overflow on a huge segment: no bound
                S = math.inf
            rows.append((a, b, S))
            loss_part += S * ((T - a) ** 2 - (T - b) ** 2) / 2.0
        return SegmentBound(T, slope0, curv0, tuple(rows), max(r[2] for r in rows), -T * slope0 - loss_part)


def _check_step(step) -> float:
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (math.isfinite(step) and step > 0):
        raise SegmentError(f"step must be a finite number > 0, got {step!r}")
    return float(step)


def segment_bound(model: nn.Module, x: Tensor, y: Tensor, direction: Tensor, step: float, *,
                  loss: str = "cross-entropy", l2: float = 0.0, pieces: int = DEFAULT_PIECES) -> SegmentBound:
    """The certificate of the step w -> w - ``step`` ``direction`` for F on the batch (x, y)
    (module docstring; docs/segment.md, Prop. 1-4).  ``direction``: a flat vector in
    ``named_parameters()`` order; ``pieces``: equal pieces of [0, step]."""
    T = _check_step(step)
    return _Problem(model, x, y, direction, loss, l2, pieces).bound(T)


def certified_segment_step(model: nn.Module, x: Tensor, y: Tensor, direction: Tensor, *,
                           loss: str = "cross-entropy", l2: float = 0.0, pieces: int = DEFAULT_PIECES,
                           start: float | None = None, tries: int = 6) -> SegmentBound:
    """A step T along -``direction`` with a certified decrease, and its certificate.

    The descent lemma on the segment: with kappa(T) the certified sup of phi'' on [0, T], a step
    T with T kappa(T) <= -phi'(0) ("good") guarantees a decrease of at least T |phi'(0)| / 2.
    The first try is T0 = 1.25 ``start`` (the previous step: steps change slowly) or, without
    it, the Cauchy step -phi'(0) / phi''(0), never above twice the Cauchy step.  Each next try
    is the fixed point's update T <- -phi'(0) / kappa(T), kept strictly between the largest good
    and the smallest bad T seen (their geometric mean otherwise): a bad T gives a good one below
    it (kappa only grows with the segment), a good T more than 1.5x below its update gives a
    larger one.
    A bad try's pieces inside [0, T'] serve the next try T' when at least half of them fit
    (no new jet pass).  At most ``tries`` certificates; returns the one with the largest
    guaranteed decrease.
    """
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise SegmentError(f"tries must be a positive integer, got {tries!r}")
    prob = _Problem(model, x, y, direction, loss, l2, pieces)
    slope, curv = prob.at(0.0)[1:3]
    if not slope < 0:
        raise SegmentError(f"the direction is not a descent direction (phi'(0) = {slope:.3g} >= 0)")
    g = -slope
    cauchy = g / curv if curv > 0 else math.inf
    if start is not None and math.isfinite(start) and start > 0:
        T = min(1.25 * float(start), 2.0 * cauchy)
    else:
        T = cauchy if math.isfinite(cauchy) else 1.0
    good, bad = 0.0, math.inf
    best = previous = None
    for _ in range(tries):
        cand = None
        if previous is not None and previous.step > T:  # reuse the bad try's pieces below T
            k = sum(1 for a, b, _ in previous.pieces if b <= T)
            if k >= max(1, pieces // 2):
                cand = _restricted(previous, k)
        if cand is None:
            cand = prob.bound(T)
        T = cand.step
        if best is None or cand.guaranteed_decrease > best.guaranteed_decrease:
            best = cand
        kappa = cand.curvature_bound
        if T * kappa <= g:
            good = max(good, T)
        else:
            bad = min(bad, T)
            previous = cand
        nxt = g / kappa if kappa > 0 else 2.0 * T
        if not good < nxt < bad:
            nxt = math.sqrt(good * bad) if good > 0 and math.isfinite(bad) else (0.5 * bad if good == 0 else 2.0 * good)
        if (T * kappa <= g and nxt <= 1.5 * T) or abs(nxt - T) <= 0.1 * T or (math.isfinite(bad) and bad <= 1.25 * good):
            break  # a good step within 1.5x of the fixed point, or the fixed point to 10 %
        T = nxt
    return best


def _restricted(bound: SegmentBound, k: int) -> SegmentBound:
    """The certificate of the step b_{k-1} from the first k pieces of ``bound`` (Prop. 1)."""
    rows = bound.pieces[:k]
    T = rows[-1][1]
    loss_part = sum(S * ((T - a) ** 2 - (T - b) ** 2) / 2.0 for a, b, S in rows)
    return SegmentBound(T, bound.slope, bound.curvature_at_start, rows, max(r[2] for r in rows),
                        -T * bound.slope - loss_part)
