"""Local certificates: the constants of RH Prop. 4.4 and 4.2 for one batch, around the weights.

The training objective is F(w) = f(psi(w; x)) + l2/2 ||w||^2 for a *given* batch (x, y).  Around
the actual weights w* (C = {||v_l - v*_l|| <= R for every layer l}, RH Cor. 4.5), the forward
pass at w* is known exactly, so instead of RH's worst case over every input of norm ||x|| the
recursion carries, per layer l,

* delta_l >= sup_C ||z_l - z*_l||, the largest move of the layer's output (z* at w*), and
  M_l = ||z*_l|| + delta_l >= sup_C ||z_l|| in place of RH's m_l;
* eps_l = L_beta R M_{l-1} + l'_z delta_{l-1} + l_v R >= sup_C ||u_l - u*_l|| for the
  pre-activation u_l = b_l(v_l, z_{l-1}), so every entry of u_l lies in [u*_i - eps_l, u*_i + eps_l];
  an element-wise activation is then Lipschitz and smooth on that box with the sups of |a'| and
  |a''| over those intervals (:meth:`~smoothchain.components.Elementwise.sup_on`), far below
  the global ones where the pre-activations sit in the flat parts;
* the Lipschitz and smoothness constants l_l, L_l of w -> z_l on C from the first and second
  derivatives of z_l = a_l(b_l(v_l, z_{l-1})) bounded jointly in the two blocks of directions
  (v_l, and the earlier layers'): l_l = l_a sqrt(v^2 + (z l_{l-1})^2) and L_l = the largest
  eigenvalue of a 2 x 2 matrix whose entry sum is RH's eq. (21);

and the loss's constants are taken over the ball of radius delta_tau around psi(w*) (softmax
probabilities move by at most delta/2).  Proofs: docs/local.md.  Everything is computed in
float64 from the actual weights; norms have the relative margin
:data:`~smoothchain.components.NORM_MARGIN`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .certificate import Certificate
from .chain import Chain, ChainError, _mul
from .components import BatchNorm, Elementwise, NORM_MARGIN, build_layers
from .functional import batch_normalize
from .losses import SUPERVISED_LOSSES, LossConstants, get_loss, loss_function
from .objective import objective_bounds
from .recursion import ChainBounds, LayerBound, _prod, chain_bounds
from .torch_chain import components_from_module, warn_eval_batch_norms

__all__ = ["certify_local", "LOCAL_LOSSES"]

#: the losses a local certificate takes (their value at psi(w*) is needed)
LOCAL_LOSSES = SUPERVISED_LOSSES


def _norm(t: Tensor) -> float:
    return float(t.detach().double().norm()) * (1 + NORM_MARGIN)


#: bytes of one chunk of examples in the tracked pass of the adjoints (autograd keeps its graph)
CHUNK_BYTES = 1 << 31
#: entries per call of an activation's sup over intervals (its temporaries are a few times this)
SUP_CHUNK_ENTRIES = 1 << 24


def _leaves64(mc) -> list:
    """Copies of the model's leaves in float64, in training mode (batch statistics, RH eq. 11);
    shared modules stay shared within the copy."""
    leaves = copy.deepcopy(list(mc.leaves))
    for _, leaf in leaves:
        leaf.double().train()
    return leaves


def _component_outputs(mc, leaves, x: Tensor, chunk: int | None = None) -> Iterator[Tensor]:
    """The batch after each component in turn (the i-th value is the output of component i).  A
    generator, so that a sweep holds only the tensors it still needs; the caller sets the grad
    mode (a ``with`` inside a generator would leak into its consumer).  ``chunk``: each leaf
    runs on that many examples at a time (float64 convolutions on the CPU unfold their whole
    input: 30 GB for VGG-16's conv1_2 at m = 128); only for modules without batch norm."""

    def run(leaf, h: Tensor) -> Tensor:
        if chunk is None or chunk >= h.shape[0]:
            return leaf(h)
        return torch.cat([leaf(part) for part in h.split(chunk)])

    h = x
    for i, comp in enumerate(mc.components):
        name, leaf = leaves[mc.leaf_index[i]]
        first = i == 0 or mc.leaf_index[i - 1] != mc.leaf_index[i]
        last = i + 1 == len(mc.components) or mc.leaf_index[i + 1] != mc.leaf_index[i]
        if first:
            leaf_input = h
        if first and last:
            h = run(leaf, h)
        elif isinstance(comp, BatchNorm):  # the normalisation of a BatchNorm leaf, before its affine part
            dims = [0] if comp.over == "entry" else [0, *range(2, h.dim())]
            h = batch_normalize(h, dims, comp.eps)
        elif last:
            h = run(leaf, leaf_input)
        else:
            raise ChainError(f"module {name!r} gives several components; local certificates "
                             f"support only batch norm among those")
        yield h


def _chunk_size(mc, m: int, requested: int | None) -> int:
    """Examples per chunk: the whole batch when a component couples the examples (batch norm),
    else ``requested`` or as many as fit in :data:`CHUNK_BYTES`."""
    if any(isinstance(c, BatchNorm) for c in mc.components):
        return m
    if requested is not None:
        return requested
    # autograd keeps about each component's output and its input: 16 bytes per float64 entry
    per_example = 16 * sum(math.prod(shape) for shape in mc.shapes)
    return max(1, min(m, CHUNK_BYTES // max(1, per_example)))


def _adjoint_norms(mc, leaves, x: Tensor, y: Tensor, loss: str, ends: list[int], chunk: int) -> list[float]:
    """||lambda*_l|| = ||df/dz_l|| at the weights for the components ``ends`` (the ends of the RH
    layers), by autograd, ``chunk`` examples at a time: f is a mean over the batch and, without
    batch norm, example n's output reads only example n, so each chunk's adjoints are those of
    (its size / m) x its own mean loss."""
    m = x.shape[0]
    squares = [0.0] * len(ends)
    for xc, yc in zip(x.split(chunk), y.split(chunk)):
        with torch.enable_grad():
            xc = xc.detach().requires_grad_(True)  # every output is then in the graph
            outs, kept, wanted = None, [], set(ends)
            for i, out in enumerate(_component_outputs(mc, leaves, xc)):
                outs = out
                if i in wanted:
                    kept.append(out)
            value = loss_function(loss, yc, xc)(outs) * (xc.shape[0] / m)
            grads = torch.autograd.grad(value, kept, allow_unused=True)
        for k, g in enumerate(grads):
            if g is not None:
                squares[k] += float(g.detach().double().pow(2).sum())
    return [math.sqrt(sq) * (1 + NORM_MARGIN) for sq in squares]


def _sup_on_box(comp: Elementwise, u: Tensor, box: float) -> tuple[float, float]:
    """comp.sup_on over the intervals [u_i - box, u_i + box], a piece of u at a time (the sup over
    a union is the max of the sups over its parts)."""
    lip = smooth = 0.0
    for part in u.detach().reshape(-1).split(SUP_CHUNK_ENTRIES):
        a, b = comp.sup_on(part - box, part + box)
        lip, smooth = max(lip, a), max(smooth, b)
    return lip, smooth


def _joint_smoothness(s1: float, s_rest: float, la: float, v: float, z: float, v_inf: float, z_inf: float,
                      l_prev: float, L_prev: float, Lb: float) -> float:
    """Largest eigenvalue of the 2 x 2 matrix of the quadratic form in (|e|, |d|)
    s1 (v_inf |e| + z_inf l |d|)(v |e| + z l |d|) + s_rest (v |e| + z l |d|)^2
    + la (2 L_beta l |e||d| + z L |d|^2), the bound on ||D^2 z_l[h, h]|| over ||(e, d)|| = 1
    (docs/local.md, Prop. 2; with v_inf = v, z_inf = z, s1 = 0 its entry sum is RH's eq. 21)."""
    # every product through _prod: a zero gain (a layer that ignores its input) removes an
    # infinite factor (a non-smooth layer before it) instead of making NaN
    a = _prod(s1, v_inf, v) + _prod(s_rest, v, v)
    c = (_prod(s1, 0.5 * (_prod(v_inf, z) + _prod(z_inf, v)), l_prev) + _prod(s_rest, v, z, l_prev)
         + _prod(la, Lb, l_prev))
    d = _prod(s1, z_inf, z, l_prev, l_prev) + _prod(s_rest, z, z, l_prev, l_prev) + _prod(la, z, L_prev)
    if math.isinf(a) or math.isinf(c) or math.isinf(d):
        return math.inf
    return 0.5 * (a + d) + math.sqrt(0.25 * (a - d) ** 2 + c * c)


def certify_local(model: nn.Module, x: Tensor, y: Tensor, *, loss: str = "cross-entropy", radius: float = 0.1,
                  l2: float = 0.0, epsilon: float = 1e-2, gap: float | None = None,
                  chunk_size: int | None = None) -> Certificate:
    """A certificate of F(w) = f(psi(w; x)) + l2/2 ||w||^2 for the batch (``x``, ``y``) on the balls
    of radius ``radius`` around the model's current weights (module docstring, docs/local.md).

    Returns a :class:`~smoothchain.certificate.Certificate` with ``mode == "local"``: its
    ``bounds.layers`` rows hold M_l (``output_bound``), l_l, L_l; ``objective.smoothness`` is
    L_F = L_psi l_f + l_psi^2 L_f + l2 (RH Prop. 4.2) with the loss constants over the reachable
    outputs.  Valid for this batch only.

    Memory: the recursion sweeps the batch through the layers once, holding one layer's tensors
    at a time; the adjoints of Prop. 4 are taken ``chunk_size`` examples at a time (default: as
    many as fit in :data:`CHUNK_BYTES`; the whole batch with batch norm), so VGG-16 at m = 128,
    224 x 224 runs in about 12 GB.  The chunking changes no bound.
    """
    if not isinstance(model, nn.Module):
        raise ChainError(f"a local certificate needs an nn.Module with its weights, got {type(model).__name__}")
    get_loss(loss, among=LOCAL_LOSSES)
    if not (isinstance(radius, (int, float)) and radius >= 0 and math.isfinite(radius)):
        raise ChainError(f"--radius must be a finite number >= 0, got {radius!r}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ChainError("x must be a batch tensor (m, ...)")
    if not bool(torch.isfinite(x).all()):
        raise ChainError("the input batch has NaN or infinite entries")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ChainError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    m, R = int(x.shape[0]), float(radius)
    x = x.detach().double()
    mc = components_from_module(model, tuple(x.shape[1:]), m, weight_norms=True)
    warn_eval_batch_norms(mc.leaves)
    leaves = _leaves64(mc)
    layers = build_layers(mc.components, mc.shapes, m, "tight", mc.names, mc.weight_norms, mc.norms_at_weights)
    chain = Chain(tuple(layers), input_norm=_norm(x), radius=R).around_weights()

    # the components of each RH layer (build_layers' grouping: a bi-affine component opens one)
    groups: list[list[int]] = []
    for i, comp in enumerate(mc.components):
        if comp.role == "bilinear" or (comp.role == "nonlinear" and not groups):
            groups.append([i])
        elif comp.role == "nonlinear":
            groups[-1].append(i)
    chunk = _chunk_size(mc, m, chunk_size)
    with torch.no_grad():
        bounds, backward, z_star, delta, out_box = _sweep(chain, groups, mc, leaves, x, R, chunk)
    loss_c = _local_loss_constants(loss, z_star, y, delta, m, out_box)
    norms = tuple(layer.weight_norm or 0.0 for layer in chain.layers)
    lam = _adjoint_norms(mc, leaves, x, y, loss, [g[-1] for g in groups], chunk)
    term = _adjoint_term(lam, backward, loss_c, delta)
    objective = objective_bounds(bounds, loss_c, l2=l2, epsilon=epsilon, gap=gap, weight_norms=norms,
                                 loss_part=term)
    return Certificate(chain, bounds, objective, "local", loss, m, type(model).__name__)


def _sweep(chain: Chain, groups: list[list[int]], mc, leaves, x: Tensor, R: float, chunk: int):
    """The forward recursion of docs/local.md over the RH layers, one sweep of the batch through
    the components (only the current layer's tensors are held).  Returns the chain bounds, the
    per-layer facts of Prop. 4, psi(w*), delta_tau and the logits' per-entry box."""
    stream = enumerate(_component_outputs(mc, leaves, x, chunk))
    # the tight recursion bounds the same quantities on the same C: each row is the smaller of
    # the two, which keeps every later row sound (docs/local.md, "Combining")
    tight_rows = chain_bounds(chain).layers
    pos, latest = -1, x  # the last component the sweep has passed, and its output

    def through(i: int) -> Tensor:  # the output of component i (the sweep never goes back)
        nonlocal pos, latest
        while pos < i:
            pos, latest = next(stream)
        assert pos == i, "the sweep asks for the components in order"
        return latest

    z_star, delta = x, 0.0
    M_prev, l_prev, L_prev = _norm(x), 0.0, 0.0
    rows = []
    backward = []  # per layer: (its gains, sup ||J_l||, a bound on sup ||J_l - J*_l||): Prop. 4
    for index, (layer, group) in enumerate(zip(chain.layers, groups), start=1):
        b = layer.bilinear
        opens = mc.components[group[0]].role == "bilinear"
        z_in = through(group[0] - 1) if group[0] > 0 else x  # what component group[0] reads
        first = through(group[0])
        u_star = first if opens else z_star
        out = through(group[-1])
        # sup over the ball of ||beta(e_W, z) + beta^v(e_b)|| / ||e||: L_beta M + l_v, or the
        # spectral norm of the batch matrix [U(z*), 1] plus L_beta delta (docs/local.md, weight gain)
        gain = _mul(b.smoothness, M_prev) + b.weight_lipschitz
        if opens:
            gain = min(gain, _batch_gain(mc, group[0], z_in, delta, b))
        eps = (_mul(gain, R) + _mul(b.input_lipschitz, delta) if opens else delta)
        v_inf, z_inf = _entry_gains(mc, group[0], z_in, delta, R, b) if opens else (0.0, 1.0)
        # per entry, u_i - u*_i = <dW_i, slice> + db_i + <W*_i, d slice>: |.| <= R v_inf + z_inf delta
        # (docs/local.md, Prop. 1), often far below the batch-level eps
        box = min(eps, _mul(R, v_inf) + _mul(z_inf, delta)) if opens else eps
        nonlinear = group[1:] if opens else group
        lips, smooths = [], []
        for k, (ci, consts) in enumerate(zip(nonlinear, layer.nonlinear)):
            comp = mc.components[ci]
            if k == 0 and isinstance(comp, Elementwise):
                lip, smooth = _sup_on_box(comp, u_star, box)
                lip, smooth = min(lip, consts.lipschitz), min(smooth, consts.smoothness)
            else:
                lip, smooth = consts.lipschitz, consts.smoothness
            lips.append(lip)
            smooths.append(smooth)
        lip_a = math.prod(lips) if lips else 1.0
        terms = [_mul(smooths[j], math.prod(lips[:j]) ** 2 * math.prod(lips[j + 1:])) for j in range(len(lips))]
        smooth_a = sum(terms)
        # the first stage's term in the per-entry form when it acts entry-wise (docs/local.md)
        entrywise = bool(nonlinear) and isinstance(mc.components[nonlinear[0]], Elementwise)
        s1, s_rest = (terms[0], sum(terms[1:])) if entrywise else (0.0, smooth_a)
        z_gain = _mul(b.smoothness, R) + b.input_lipschitz  # L_beta R + l'_z
        v_gain = gain  # <= L_beta M_{l-1} + l_v
        z_star = out
        u_norm = _norm(u_star)
        del z_in, first, u_star  # the previous layer's tensors go before the next layer's come
        delta = _mul(lip_a, eps)
        lip = _mul(lip_a, math.hypot(v_gain, _mul(z_gain, l_prev)))
        smooth = _joint_smoothness(s1, s_rest, lip_a, v_gain, z_gain, min(v_inf, v_gain), min(z_inf, z_gain),
                                   l_prev, L_prev, b.smoothness)
        # the layer's own second-order term in the quadratic form of Prop. 4
        q = (s1, s_rest, lip_a, v_gain, z_gain, min(v_inf, v_gain), min(z_inf, z_gain), b.smoothness)
        # ||Da(u) - Da(u*)||: for one element-wise stage max_i |a'(u_i) - a'(u*_i)| <= s_a box,
        # else s_a eps (the smoothness on the box, ||u - u*|| <= eps)
        move = box if entrywise and len(nonlinear) == 1 else eps
        if opens:  # J = Da(u) B(v), ||B(v) - B(v*)|| <= L_beta R
            j_dev = _mul(_mul(smooth_a, move), z_gain) + _mul(lip_a, _mul(b.smoothness, R))
            j_sup = _mul(lip_a, z_gain)
        else:
            j_dev, j_sup = _mul(smooth_a, move), lip_a
        backward.append((q, j_sup, j_dev))
        tight = tight_rows[index - 1]
        M = min(_norm(z_star) + delta, tight.output_bound)
        lip, smooth = min(lip, tight.lipschitz), min(smooth, tight.smoothness)
        rows.append(LayerBound(index, layer.name or f"layer{index}", M, lip, smooth, u_norm + eps, lip_a, smooth_a))
        M_prev, l_prev, L_prev = M, lip, smooth
    bounds = ChainBounds(tuple(rows), M_prev, l_prev, L_prev, R, chain.input_norm, "weights")
    # every logit moves by at most `box` when the last layer ends with its bi-affine part
    out_box = box if opens and not nonlinear else math.inf
    return bounds, backward, through(len(mc.components) - 1), delta, out_box


def _adjoint_term(lam: list[float], backward, loss_c: LossConstants, delta_out: float) -> float:
    """A bound on sup_C sup_{||h|| = 1} D^2 (f o psi)[h, h] (docs/local.md, Prop. 4):

    D^2 (f o psi)[h, h] = D^2 f[z'_tau, z'_tau] + sum_l <lambda_l, Q_l(h)>, with lambda_l = df/dz_l
    (the adjoint; ``lam[l]`` >= ||lambda*_l|| at the weights, by autograd, its move over C
    bounded backwards) and Q_l(h) the layer's own second-order term.  With ||z'_l|| <= g_l^T |e|
    (|e| the vector of the layers' ||e_l||) and |<lambda_l, Q_l(h)>| <= Lambda_l |e|^T M_l |e|,
    the bound is the largest eigenvalue of sum_l Lambda_l M_l + L_f g_tau g_tau^T (non-negative
    entries)."""
    tau = len(backward)
    # Lambda_l >= sup_C ||lambda_l||, backwards
    Lams = [0.0] * tau
    Lam, dev = loss_c.lipschitz, _mul(loss_c.smoothness, delta_out)
    for l in range(tau - 1, -1, -1):
        _, j_sup, j_dev = backward[l]
        Lam = min(Lam, lam[l] + dev)
        Lams[l] = Lam
        # lambda_{l-1} - lambda*_{l-1} = J^T (lambda - lambda*) + (J - J*)^T lambda*
        dev = _mul(j_sup, dev) + _mul(j_dev, lam[l])
        Lam = _mul(j_sup, Lam)
    # the quadratic form in |e|, forwards
    M = torch.zeros(tau, tau, dtype=torch.float64)
    g = torch.zeros(tau, dtype=torch.float64)
    for l in range(tau):
        (s1, s_rest, la, v, z, v_inf, z_inf, Lb), _, _ = backward[l]
        e = torch.zeros(tau, dtype=torch.float64)
        e[l] = 1.0
        b = _lin(v, e, z, g)  # ||D u_l[h]|| <= b^T |e|
        a = _lin(v_inf, e, z_inf, g)  # every entry of D u_l[h] is <= a^T |e|
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) and math.isfinite(Lams[l])):
            return math.inf  # an unbounded gain: no adjoint bound (RH Prop. 4.2 stays)
        # s1 (a^T|e|)(b^T|e|) + s_rest (b^T|e|)^2 + 2 la L_beta |e_l| (g^T|e|), as symmetric matrices
        M_l = (_lin(0.5 * s1, torch.outer(a, b) + torch.outer(b, a), s_rest, torch.outer(b, b))
               + _mul(la, Lb) * (torch.outer(e, g) + torch.outer(g, e)))
        if Lams[l] > 0:
            if bool(torch.isinf(M_l).any()) or math.isinf(Lams[l]):
                return math.inf
            M = M + Lams[l] * M_l
        g = la * b if la > 0 else torch.zeros_like(g)  # ||z'_l|| <= la ||D u_l[h]||
    if math.isinf(loss_c.smoothness) or bool(torch.isinf(g).any()):
        return math.inf
    M = M + loss_c.smoothness * torch.outer(g, g)
    if not bool(torch.isfinite(M).all()):
        return math.inf
    M = (M + M.T) / 2
    # the Perron root of a non-negative matrix is at most its largest row sum (Gershgorin): the
    # fallback when LAPACK's eigh fails to converge
    rows = float(M.sum(dim=1).max()) if tau else 0.0
    try:
        top = float(torch.linalg.eigvalsh(M)[-1]) if tau else 0.0
        top += 1e-12 * float(M.abs().sum())  # the eigensolver's backward error
    except torch.linalg.LinAlgError:
        top = rows
    return min(top, rows) * (1 + 1e-12) + 1e-300


def _lin(alpha: float, A: Tensor, beta: float, B: Tensor) -> Tensor:
    """alpha A + beta B with 0 * inf = 0 for the scalars (a zero gain removes its term)."""
    out = torch.zeros_like(A)
    if alpha != 0.0:
        out = out + alpha * A
    if beta != 0.0:
        out = out + beta * B
    return out


def _batch_gain(mc, i: int, z_in: Tensor, delta_in: float, b) -> float:
    """sup over the ball of the weight gain of bi-affine component i: ||[U(z*), 1]||_2 +
    L_beta delta (docs/local.md, weight gain); inf when the component does not say."""
    comp, leaf = mc.components[i], mc.leaves[mc.leaf_index[i]][1]
    got = comp.batch_gain_at(z_in, getattr(leaf, "bias", None) is not None)
    if got is None:
        return math.inf
    return got + _mul(b.smoothness, delta_in)


def _entry_gains(mc, i: int, z_in: Tensor, delta_in: float, R: float, b) -> tuple[float, float]:
    """Per-entry gains of bi-affine component i on C: every entry of D u[h] is at most
    v_inf ||e|| + z_inf ||D z_{l-1}[d]|| (docs/local.md, per-entry bounds); the 2-norm gains
    when the component does not say (:meth:`~smoothchain.components.Component.entry_norms_at`)."""
    comp, leaf = mc.components[i], mc.leaves[mc.leaf_index[i]][1]
    weight = getattr(leaf, "weight", None)
    got = comp.entry_norms_at(weight, z_in) if weight is not None else None
    if got is None:
        return math.inf, math.inf
    slice_norm, row = got
    s = slice_norm + delta_in  # a slice moves by at most the whole batch's move
    v_inf = math.sqrt(s * s + 1.0) if b.weight_lipschitz > 0 else s
    return v_inf, row + R  # the rows of W* + Delta; the built-in bi-affine parts have beta^z = 0


def _local_loss_constants(loss: str, z_star: Tensor, y: Tensor, delta: float, m: int,
                          box: float = math.inf) -> LossConstants:
    """sup of ||grad f|| and ||grad^2 f|| over ||Z - Z*|| <= delta, every entry of Z - Z* at most
    ``box`` (docs/local.md, Prop. 3)."""
    z_star = z_star.reshape(m, -1)
    if loss == "cross-entropy":
        p = torch.softmax(z_star, dim=-1)
        target = y.double() if y.is_floating_point() else torch.nn.functional.one_hot(y, p.shape[-1]).double()
        # |log p_k - log p*_k| <= |dz_k| + |d lse| <= 2 box, so p_k <= p*_k e^(2 box)
        top = min(0.5, float(p.max()) + 0.5 * delta, float(p.max()) * math.exp(min(2.0 * box, 700.0)))
        smooth = top * (1 + NORM_MARGIN) / m
        # grad f = (P - Y)/m moves by at most (sup ||grad^2 f||) delta
        lip = min(_norm(p - target.reshape(p.shape)) / m + smooth * delta, math.sqrt(2.0 / m))
        return LossConstants(lip, smooth, loss)
    diff = z_star - y.double().reshape(z_star.shape)
    return LossConstants((_norm(diff) + delta) / m, 1.0 / m, loss)
