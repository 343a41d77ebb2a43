"""DSGD for networks as a ``torch.optim.Optimizer`` (F Algo. 4.1).

One step, given the gradient g = (g_1, ..., g_K) of the objective (F eqs. 21-22: batch mean of
||output - target||_2^2, no 1/2) already in ``.grad`` (or computed by ``closure``):

1. p_i(w) of F Prop. 4.3 for the current weights, from *upper bounds* on the operator norms
   ||[W_j | b_j]||_q, j > i (exact, or certified incremental bounds, see below);
2. choose the layers to update (``variant``):

   * ``"greedy"`` -- F Algo. 4.1: i* = argmax_i ||g_i||_* / p_i(w) (first maximiser); this is the
     duality map of the Finsler structure (25), F eq. (33);
   * ``"all"`` -- F Sec. 5.2's DSGD_ALL: every layer, each with its own step;
   * ``"random"`` -- one layer uniformly at random (F Sec. 5.1's RANDOM);
   * ``"sequential"`` -- layers 1, 2, ..., K, 1, ... in turn (F Sec. 5.1's SEQUENTIAL);

3. update each chosen layer along a direction Q ~ rho_q(g_i) / ||g_i||_* (F Prop. 4.5) with the
   certified step of the descent lemma (F Prop. 4.4),

       [W_i | b_i] <- [W_i | b_i] - lr * eps * ip / (p_i(w)^2 * bound^2) * Q,

   ip <= <g_i, Q> and bound >= ||Q||_q certified.  For q = 1, inf, Q is F's sign matrix
   (eqs. 27, 29), ip = ||g_i||_* and bound = 1 exactly, so this *is* F Algo. 4.1 line 10:
   -lr eps rho_q(g_i) / p_i^2.  For q = 2, Q is the polar factor U V^T (eq. 28) computed from
   m x m matrices (:mod:`smoothchain.dsgd.lowrank`), and ip / bound = ||g_i||_* up to rounding.

``eps`` is the theoretical step: 1 in batch mode (F Thm 4.8), and in stochastic mode with a
target ``gamma`` the step (gamma - sigma2) / (4 (gamma + sigma2)) of F Thm 4.12 (sigma2 from
:func:`smoothchain.dsgd.rates.variance_bound` unless given).  ``lr`` multiplies it, so
``lr = 1`` is the theory.  With 0 < lr <= 1 a full-batch step of greedy, random or sequential
updates a single layer i and decreases f by at least (lr - lr^2/2) (ip/bound)^2 / p_i^2
(F Props. 4.3-4.4); "all" has no such guarantee.  F's RANDOM and SEQUENTIAL baselines do not
divide by p_i^2 (their step is tuned): ``bound_scaling=False`` reproduces them
(update -lr * rho_q(g_i)).

Speed (``docs/dsgd.md`` section 4.1, ``benchmarks/dsgd_step.py``).

* Weight norms inside p_i are certified *upper* bounds at every step: exact (q = 1, inf: float64
  column / row sums times 1 + gamma; q = 2: sqrt of the largest eigenvalue of the float64 Gram
  matrix times 1 + 4(k + 1)u) every ``norm_refresh`` steps, and in between the increment
  ||W - s Q|| <= (||W|| + s ||Q||)(1 + 3u k') after each of our updates (k' = 1 for q = 1, inf,
  sqrt(min(r, c)) for q = 2).  Any other change of a parameter (its tensor version counter
  moved: ``load_state_dict``, user code) forces an exact recomputation.  ``norm_refresh=1``
  makes every norm exact.
* q = 1, inf (:mod:`smoothchain.dsgd.sign`): one read-only pass over each gradient for its dual
  norm, arg maxima and a one-entry-per-column (row) update for the chosen layer only; with
  q = 1 a large layer is first screened by a Cauchy-Schwarz bound from one dot product.
* q = 2: a forward hook on every ``nn.Linear`` records the layer input X and, through a tensor
  hook, the gradient Delta at its output, so g_i = Delta^T [X | 1] has rank <= m (the batch)
  and the nuclear norm and polar factor come from m x m matrices.  The records are checked
  against the true ``.grad`` with a random probe (a stale record falls back to the dense
  route) and are cleared by ``zero_grad`` and ``step``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..dsgd.bounds import ChainConstants, check_data, check_data_bound, layer_matrix, parse_model
from ..dsgd.lowrank import certified_direction, polar_core, unit_roundoff
from ..dsgd.lowrank import gamma as gamma_n  # the rounding constant gamma_n = nu / (1 - nu)
from ..dsgd.norms import check_q, duality_map, spectral_norm
from ..dsgd.sign import apply_sign_step, sign_dual
from ..dsgd.rates import stochastic_step_size, variance_bound

__all__ = ["DSGD"]

_UNIT_ROUNDOFF: dict = {}


def _unit_roundoff(dtype: torch.dtype) -> float:
    u = _UNIT_ROUNDOFF.get(dtype)
    if u is None:
        u = _UNIT_ROUNDOFF[dtype] = unit_roundoff(dtype)
    return u


#: the grad-mode switch behind ``torch.no_grad`` (public fallback if a build lacks it)
_set_grad_enabled = getattr(torch._C, "_set_grad_enabled", torch.set_grad_enabled)

VARIANTS = ("greedy", "all", "random", "sequential")
MODES = ("batch", "stochastic")
#: q = 2: layers with min(r, c) up to this get exact nuclear norms in the greedy screening at once
EXACT_NORM_MAX = 64
#: q = 1, inf: layers with at most this many weight entries get their arg maxima (for the
#: direction) together with the dual norm; larger ones only the maxima, and with q = 1 are first
#: screened with a Frobenius upper bound (see ``_greedy_sign``)
SIGN_INDEX_NUMEL = 1 << 15


class DSGD(torch.optim.Optimizer):
    """Duality structure gradient descent for an ``nn.Sequential`` of ``nn.Linear`` layers, each
    followed by a bounded activation (sigmoid, tanh); F Algo. 4.1.

    Args:
        model: the network; its Linear layers are the K layers, input to output.
        q: 1, 2 or math.inf -- the layer norms (F Assumption 4.2, Prop. 4.5).
        variant: "greedy" (F Algo. 4.1), "all", "random" or "sequential".
        lr: multiplier of the theoretical step (1 = F Thm 4.8 / 4.12).
        data_bound: D with ||x||_inf, ||z||_inf <= D for inputs and targets (F Assumption 4.1 ii).
        mode: "batch" (closure returns the full objective) or "stochastic" (a mini-batch mean).
        gamma: stochastic mode only: the target of F Thm 4.12; sets eps from gamma and sigma2.
        sigma2: variance bound for ``gamma`` (default: ``variance_bound(model, q, batch_size)``).
        batch_size: mini-batch size b, needed for the default sigma2.
        seed: seed of the "random" variant's generator (default: torch's global generator).
        bound_scaling: divide steps by p_i(w)^2 (required for "greedy").
        method: q = 2 route: "auto" (low-rank/Gram core, certified), "gram" (the same, never
            using the hooks' factors) or "svd" (LAPACK SVD of the dense gradient, the reference).
        capture: "auto" (hooks record layer inputs / output gradients when q = 2) or "none".
        norm_refresh: exact recomputation period of the incremental weight-norm bounds.

    After :meth:`step`, ``last_layers`` lists the updated layers (1-based), ``last_p`` the
    p_i(w) used, ``last_dual_norms`` the ||g_i||_* computed (None where not needed) and
    ``last_certified`` the certified ip / bound of each updated layer.
    """

    def __init__(self, model: nn.Module, q=2, variant: str = "greedy", lr: float = 1.0, *,
                 data_bound: float = 1.0, mode: str = "batch", gamma: float | None = None,
                 sigma2: float | None = None, batch_size: int | None = None,
                 seed: int | None = None, bound_scaling: bool = True, method: str = "auto",
                 capture: str = "auto", norm_refresh: int = 10):
        self.q = check_q(q)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if method not in ("auto", "svd", "gram"):
            raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
        if capture not in ("auto", "none"):
            raise ValueError(f"capture must be 'auto' or 'none', got {capture!r}")
        if isinstance(norm_refresh, bool) or not isinstance(norm_refresh, int) or norm_refresh < 1:
            raise ValueError(f"norm_refresh must be a positive integer, got {norm_refresh!r}")
        _check_lr(lr)
        self.data_bound = check_data_bound(data_bound)
        if not bound_scaling and variant == "greedy":
            raise ValueError("variant 'greedy' needs bound_scaling=True (its choice uses p_i)")
        self.variant, self.mode, self.method = variant, mode, method
        self.bound_scaling = bool(bound_scaling)
        self.norm_refresh = norm_refresh
        self._layers = parse_model(model)
        self.model = model
        self._consts = ChainConstants.build(self._layers, self.q, self.data_bound)
        #: (rows, cols) of each layer matrix [W | b]
        self._dims = [(sp.out_features, sp.in_features + int(sp.bias)) for sp in self._layers]

        self.sigma2 = None
        if gamma is not None:
            if mode != "stochastic":
                raise ValueError(f"gamma (F Thm 4.12) is only used in stochastic mode, got "
                                 f"gamma={gamma!r} with mode={mode!r}")
            if sigma2 is None:
                if batch_size is None:
                    raise ValueError("stochastic mode with gamma needs batch_size (or sigma2)")
                sigma2 = variance_bound(model, self.q, batch_size, self.data_bound)
            self.sigma2 = float(sigma2)
            self.theory_step = stochastic_step_size(gamma, sigma2)
        else:
            if sigma2 is not None:
                raise ValueError(f"sigma2={sigma2!r} is only used together with gamma")
            self.theory_step = 1.0
        self.gamma = gamma

        groups = []
        for spec in self._layers:
            params = [spec.linear.weight] + ([spec.linear.bias] if spec.bias else [])
            groups.append({"params": params, "layer": spec.index})
        super().__init__(groups, {"lr": lr})
        self._gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.last_layers: list[int] = []
        self.last_p: list[float] = []
        self.last_dual_norms: list[float | None] = []
        self.last_certified: list[float | None] = []
        # per-layer weight-norm bound: (bound, weight version, bias version, steps since exact)
        self._norm_cache: list[tuple | None] = [None] * len(self._layers)
        self._records: list[list] = [[] for _ in self._layers]
        self._hooks = []
        self._probes: list[torch.Tensor | None] = [None] * len(self._layers)
        self._fac_cache: dict = {}
        self._abs_bufs: dict = {}
        # the layers' parameters (the tensors of the param groups), looked up once
        self._W = [sp.linear.weight for sp in self._layers]
        self._b = [sp.linear.bias if sp.bias else None for sp in self._layers]
        # rounding of a stored update, ||fl(W - sQ)|| <= (1 + 3u k)(||W|| + s||Q||) with k = 1
        # (q = 1, inf: entrywise relative errors scale column / row sums) or sqrt(min(r, c))
        # (q = 2: ||E||_2 <= ||E||_F <= u ||W'||_F <= u sqrt(rank) ||W'||_2)
        self._round_k = [math.sqrt(min(r, c)) if self.q == 2.0 else 1.0 for r, c in self._dims]
        # q = 1, inf: <G, Q> >= N (1 - gamma_{r+c}) (float64 summation of the exact maxima)
        self._sign_ip = [1.0 - gamma_n(r + c + 1, torch.float64) for r, c in self._dims]
        # q = 1 greedy screening of the large layers (see _greedy_sign): (dtype, factor) cache
        self._screen_fac = [(None, None)] * len(self._layers)
        self._screened = [self.q == 1.0 and len(self._layers) > 1 and W.numel() > SIGN_INDEX_NUMEL
                          for W in self._W]
        if capture == "auto" and self.q == 2.0 and method == "auto":
            for i, spec in enumerate(self._layers):
                self._hooks.append(spec.linear.register_forward_hook(self._make_hook(i)))

    # ----------------------------------------------------------------------------------------
    # checkpoints: the incremental norm bounds and the "random" generator travel with the state
    def state_dict(self):
        sd = super().state_dict()
        sd["dsgd"] = {"norm_cache": [None if c is None else (c[0], c[3]) for c in self._norm_cache],
                      "generator": None if self._gen is None else self._gen.get_state()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Restore; load the model's weights first (the restored norm bounds are attached to
        the parameters' current values, so a resumed run repeats an uninterrupted one)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("dsgd", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        for i, c in enumerate(extra.get("norm_cache", [])):
            if c is None or i >= len(self._layers):
                continue
            self._norm_cache[i] = (float(c[0]), *self._versions(i), int(c[1]))
        if extra.get("generator") is not None and self._gen is not None:
            self._gen.set_state(extra["generator"])

    # ----------------------------------------------------------------------------------------
    # factor capture (q = 2)
    def _make_hook(self, i: int):
        records = self._records

        def hook(mod, inputs, out):
            if not (torch.is_grad_enabled() and out.requires_grad):
                return
            x = inputs[0].detach()

            def grad_hook(g, x=x):
                records[i].append((x, g.detach()))

            out.register_hook(grad_hook)

        return hook

    def remove_hooks(self) -> None:
        """Remove the factor-capturing hooks (q = 2 then uses the dense route)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._clear_records()

    def _clear_records(self) -> None:
        for r in self._records:
            r.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._clear_records()
        super().zero_grad(set_to_none=set_to_none)

    def _factors(self, i: int, GW: torch.Tensor, gb: torch.Tensor | None):
        """(A, X) with [GW | gb] = A [X | 1] (A = Delta^T) if the records match the gradient."""
        if i in self._fac_cache:
            return self._fac_cache[i]
        self._fac_cache[i] = out = self._factors_uncached(i, GW, gb)
        return out

    def _factors_uncached(self, i: int, GW: torch.Tensor, gb: torch.Tensor | None):
        recs = self._records[i]
        spec = self._layers[i]
        if not recs or not self._hooks:
            return None
        xs = [x.reshape(-1, spec.in_features) for x, _ in recs]
        ds = [g.reshape(-1, spec.out_features) for _, g in recs]
        m = sum(x.shape[0] for x in xs)
        r, c = spec.out_features, spec.in_features + (1 if spec.bias else 0)
        if m >= min(r, c):
            return None
        X = xs[0] if len(xs) == 1 else torch.cat(xs)
        D = ds[0] if len(ds) == 1 else torch.cat(ds)
        if X.dtype != GW.dtype or D.dtype != GW.dtype:
            return None
        # probe: compare [GW | gb] v with Delta^T ([X | 1] v) for a fixed random v
        v = self._probes[i]
        if v is None or v.dtype != GW.dtype:
            g = torch.Generator().manual_seed(1234 + i)
            v = torch.randn(c, generator=g, dtype=torch.float64).to(GW.dtype)
            self._probes[i] = v
        vw = v[: spec.in_features]
        Xv = X @ vw
        Gv = GW @ vw
        if spec.bias:
            Xv = Xv + v[-1]
            Gv = Gv + gb * v[-1]
        Fv = D.T @ Xv
        scale = float(torch.linalg.vector_norm(D)) * float(torch.linalg.vector_norm(Xv))
        if not float(torch.linalg.vector_norm(Gv - Fv)) <= 1e-4 * scale + 1e-30:
            return None
        return D.T, X

    # ----------------------------------------------------------------------------------------
    # weight norms (upper bounds) and p_i
    def _exact_norm(self, spec) -> float:
        """Certified upper bound on ||[W | b]||_q, computed from scratch."""
        W = spec.linear.weight.detach()
        b = spec.linear.bias.detach() if spec.bias else None
        r, c = W.shape[0], W.shape[1] + (1 if spec.bias else 0)
        u = unit_roundoff(torch.float64)
        if self.q == 1.0:
            cols = W.abs().sum(dim=0, dtype=torch.float64)
            val = float(cols.max())
            if b is not None:
                val = max(val, float(b.abs().sum(dtype=torch.float64)))
            return val * (1.0 + gamma_n(r + 1, torch.float64))
        if self.q == math.inf:
            rows = W.abs().sum(dim=1, dtype=torch.float64)
            if b is not None:
                rows = rows + b.abs().to(torch.float64)
            return float(rows.max()) * (1.0 + gamma_n(c + 1, torch.float64))
        M = layer_matrix(spec)
        # sqrt(lambda_max) of a float64 Gram matrix; eigvalsh is backward stable with error
        # ~ n u ||Gram||, covered by the relative slack below
        return spectral_norm(M) * (1.0 + 4 * (min(r, c) + 1) * u)

    def _versions(self, i: int) -> tuple[int, int]:
        b = self._b[i]
        return self._W[i]._version, (0 if b is None else b._version)

    def _norm_bound(self, i: int) -> float:
        """Certified upper bound on ||[W_i | b_i]||_q: the cached one while the parameters are
        unchanged since our last update (tensor version counters) and fewer than
        ``norm_refresh`` increments were added, else exact (:meth:`_exact_norm`)."""
        c = self._norm_cache[i]
        b = self._b[i]
        if (c is not None and c[1] == self._W[i]._version and c[2] == (0 if b is None else b._version)
                and c[3] < self.norm_refresh):
            return c[0]
        val = self._exact_norm(self._layers[i])
        self._norm_cache[i] = (val, *self._versions(i), 0)
        return val

    def _after_update(self, i: int, step_norm: float) -> None:
        """Certified increment ||W - s Q|| <= ||W|| + s ||Q|| (+ rounding of the stored result)."""
        c = self._norm_cache[i]
        if c is not None:
            fac = 1.0 + 3.0 * _unit_roundoff(self._W[i].dtype) * self._round_k[i]
            self._norm_cache[i] = ((c[0] + step_norm) * fac, *self._versions(i), c[3] + 1)

    def layer_bounds(self) -> list[float]:
        """p_i(w) of F Prop. 4.3 at the current weights (F eq. 23), from certified norm bounds."""
        nb = self._norm_bound
        return self._consts.p([0.0] + [nb(i) for i in range(1, len(self._W))])

    def check_data(self, x, z=None, *, rescale: bool = False):
        """F Assumption 4.1 (ii) for this optimizer's ``data_bound`` (see ``bounds.check_data``)."""
        return check_data(x, z, self.data_bound, rescale=rescale)

    # ----------------------------------------------------------------------------------------
    # per-layer dual norms and directions
    def _grads(self, i: int):
        """(G_W, g_b) of layer i, detached; a missing gradient counts as zero."""
        W, b = self._W[i], self._b[i]
        GW = W.grad
        GW = torch.zeros_like(W) if GW is None else GW.detach()
        if b is None:
            return GW, None
        gb = b.grad
        return GW, (torch.zeros_like(b) if gb is None else gb.detach())

    def _prepare(self, i: int, cache: dict):
        """Dual norm ||g_i||_* (F eq. 26) and what the direction needs, cached per step."""
        if i in cache:
            return cache[i]
        GW, gb = self._grads(i)
        if self.method == "svd":
            G = layer_matrix(self._layers[i], grad=True).to(torch.float64)
            rho, N = duality_map(G, 2, method="svd")
            info = ("svd", N, rho, None, GW, gb)
        else:
            fac = self._factors(i, GW, gb)
            if fac is not None:
                A, X = fac
                core = polar_core(A, X, ones_column=gb is not None)
                info = ("factored", core.nuclear, core, (A, X), GW, gb)
            else:
                G = layer_matrix(self._layers[i], grad=True)
                transposed = G.shape[0] > G.shape[1]
                Bm = G.T if transposed else G
                core = polar_core(None, Bm)
                info = ("dense", core.nuclear, core, (Bm, transposed), GW, gb)
        cache[i] = info
        return info

    def _abs_buffer(self, i: int) -> torch.Tensor | None:
        """Layer i's persistent buffer for |G_W| when the layer is large (None otherwise; see
        :mod:`smoothchain.dsgd.sign`)."""
        W = self._W[i]
        if W.numel() <= SIGN_INDEX_NUMEL:
            return None
        buf = self._abs_bufs.get(i)
        if buf is None or buf.dtype != W.dtype:
            buf = self._abs_bufs[i] = torch.empty(W.shape, dtype=W.dtype)
        return buf

    def _direction(self, i: int, info):
        """(update function, ip, bound): the step s * Q is applied by ``update(s)``."""
        kind, N, a, b, GW, gb = info
        spec = self._layers[i]
        lin = spec.linear
        if kind == "svd":
            rho = a  # F eq. (28), float64; Q = rho / N
            if N <= 0:
                return None, 0.0, 1.0
            Q = rho / N
            bound = spectral_norm(Q) * (1.0 + 8 * unit_roundoff(torch.float64) * (min(Q.shape) + 1))
            G = layer_matrix(spec, grad=True).to(torch.float64)
            ip = float((G * Q).sum()) * (1.0 - gamma_n(G.numel(), torch.float64))
            Qw = Q.to(GW.dtype)

            def update(s):
                n_in = spec.in_features
                lin.weight.add_(Qw[:, :n_in], alpha=-s)
                if spec.bias:
                    lin.bias.add_(Qw[:, n_in], alpha=-s)
            return update, ip, bound
        core = a
        if kind == "factored":
            A, X = b
            QW, qb, ip, bound = certified_direction(core, A, X, (GW, gb) if gb is not None else GW,
                                                    bias_column=gb is not None)
        else:
            Bm, transposed = b
            G = layer_matrix(spec, grad=True)
            Q, _, ip, bound = certified_direction(core, None, Bm, G.T if transposed else G)
            if Q is not None:
                Q = Q.T if transposed else Q
                QW, qb = Q[:, : spec.in_features], (Q[:, spec.in_features] if spec.bias else None)
            else:
                QW = qb = None
        if QW is None:
            return None, 0.0, 1.0

        def update(s):
            lin.weight.add_(QW, alpha=-s)
            if qb is not None:
                lin.bias.add_(qb, alpha=-s)
        return update, ip, bound

    def _screen(self, p: list[float], cache: dict) -> list[int]:
        """Layers that can maximise ||g_i||_* / p_i.  Small layers (min(r, c) <= 64) get their
        exact nuclear norm at once; a large layer only gets the upper bound
        ||G||_* <= min(sqrt(rank) ||G||_F, sum_k ||delta_k|| ||[x_k; 1]||) (rank G <= batch; the
        second is the triangle inequality over the batch's rank-one terms).  A large layer whose
        upper bound is below a small layer's exact ratio is never the arg max, so its b x b core
        is not computed.  Large layers left in the race keep the lower bound ||G||_F."""
        best = 0.0
        upper: dict[int, float] = {}
        for i, spec in enumerate(self._layers):
            r, c = spec.out_features, spec.in_features + (1 if spec.bias else 0)
            if min(r, c) <= EXACT_NORM_MAX:
                best = max(best, self._prepare(i, cache)[1] / p[i])
                continue
            GW, gb = self._grads(i)
            fac = self._factors(i, GW, gb)
            if fac is not None:
                A, X = fac
                xn2 = (X * X).sum(dim=1, dtype=torch.float64) + (1.0 if gb is not None else 0.0)
                an = torch.linalg.vector_norm(A.to(torch.float64), dim=0)
                upper[i] = float((an * xn2.sqrt()).sum()) * (1.0 + 1e-12) / p[i]
            else:
                fro = float(torch.linalg.vector_norm(GW, dtype=torch.float64))
                if gb is not None:
                    fro = math.hypot(fro, float(torch.linalg.vector_norm(gb, dtype=torch.float64)))
                upper[i] = fro * math.sqrt(min(r, c)) * (1.0 + 1e-12) / p[i]
        return [i for i in range(len(self._layers)) if i not in upper or upper[i] >= best]

    def _greedy_sign(self, p: list[float], duals: list) -> int:
        """i* = argmax_i ||g_i||_* / p_i (first maximiser), q = 1 / inf (F Algo. 4.1 line 9).

        q = 1 screening: the column maxima of a large gradient are a strided reduction, the
        slowest pass of the step, so a large layer is first bounded by Cauchy-Schwarz over its c
        columns, ||G||_{1,*} = sum_j max_i |G_ij| <= sum_j ||G_:j||_2 <= sqrt(c) ||G||_F, from one
        dot product (rounding: ||G||_F^2 <= fl(G . G) / (1 - gamma_n)).  A layer whose bound / p_i
        is below another layer's exact ratio cannot be the arg max and is skipped."""
        best, best_i = -1.0, 0
        screened = self._screened
        K = len(screened)
        for i in range(K):
            if not screened[i]:
                r = self._sign_dual(i, duals).norm / p[i]
                if r > best:
                    best, best_i = r, i
        for i in range(K):
            if not screened[i]:
                continue
            GW, gb = self._grads(i)
            v = GW.reshape(-1)
            sq = torch.dot(v, v)
            if gb is not None:
                sq = sq + torch.dot(gb, gb)
            if math.sqrt(float(sq)) * self._screen_factor(i, GW.dtype) / p[i] < best:
                continue
            r = self._sign_dual(i, duals).norm / p[i]
            if r > best or (r == best and i < best_i):
                best, best_i = r, i
        return best_i

    def _screen_factor(self, i: int, dtype: torch.dtype) -> float:
        """sqrt(c / (1 - gamma_n)) (1 + 1e-12) for layer i's n = r c entries in ``dtype``, so that
        ||G||_{1,*} <= factor * sqrt(fl(G . G)); inf where gamma_n is useless (>= 1)."""
        cached_dtype, fac = self._screen_fac[i]
        if cached_dtype is not dtype:
            r, c = self._dims[i]
            g = gamma_n(r * c, dtype)
            fac = math.sqrt(c / (1.0 - g)) * (1.0 + 1e-12) if g < 1.0 else math.inf
            self._screen_fac[i] = (dtype, fac)
        return fac

    def _sign_dual(self, i: int, duals: list):
        """||g_i||_* for q = 1 / inf (:func:`smoothchain.dsgd.sign.sign_dual`), stored in duals."""
        GW, gb = self._grads(i)
        d = duals[i] = sign_dual(GW, gb, self.q, dense_max=SIGN_INDEX_NUMEL)
        return d

    def _choose(self, p: list[float], K: int, cache: dict) -> list[int]:
        if self.variant == "greedy":
            candidates = list(range(K))
            if K > 1 and self.method != "svd":
                candidates = self._screen(p, cache)
            if len(candidates) == 1:
                return candidates
            ratios = {i: self._prepare(i, cache)[1] / p[i] for i in candidates}
            return [max(candidates, key=lambda i: (ratios[i], -i))]
        if self.variant == "all":
            return list(range(K))
        if self.variant == "random":
            return [int(torch.randint(K, (1,), generator=self._gen).item())]
        return [self.state[self._W[0]].get("dsgd_step", 0) % K]

    def step(self, closure=None):
        """One step of F Algo. 4.1; ``closure`` (optional) re-evaluates the objective, calls
        ``backward()`` and returns the loss, which ``step`` returns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        prev = torch.is_grad_enabled()
        _set_grad_enabled(False)  # what torch.no_grad() does, without its per-call objects
        try:
            self._step()
        finally:
            _set_grad_enabled(prev)
        return loss

    def _step(self) -> None:
        groups = self.param_groups
        for group in groups:
            lr = group["lr"]
            if type(lr) is not float or not 0.0 < lr < math.inf:
                _check_lr(lr)
        p = self.layer_bounds()
        if self.q == 2.0:
            chosen, norms, certified = self._step_polar(p, groups)
        else:
            chosen, norms, certified = self._step_sign(p, groups)
        state = self.state[self._W[0]]
        state["dsgd_step"] = state.get("dsgd_step", 0) + 1
        if self._hooks:
            self._clear_records()
        self.last_layers = [i + 1 for i in chosen]
        self.last_p = p
        self.last_dual_norms = norms
        self.last_certified = certified

    def _step_sign(self, p: list[float], groups):
        """q = 1 / inf: F Algo. 4.1 with the sign duality maps of F eqs. (27) / (29), for which
        ||Q||_q = 1 and <g_i, Q> = ||g_i||_*: the certified step ip / (p_i^2 * 1^2) is F's
        1 / p_i^2 (times ||g_i||_*, as rho = ||g_i||_* Q) up to the float64 summation error."""
        K = len(self._W)
        duals: list = [None] * K
        if self.variant == "greedy":
            chosen = [self._greedy_sign(p, duals)]
        else:
            chosen = self._choose(p, K, {})
        certified: list[float | None] = [None] * K
        eps, q = self.theory_step, self.q
        for i in chosen:
            d = duals[i] if duals[i] is not None else self._sign_dual(i, duals)
            ip = d.norm * self._sign_ip[i]
            if not ip > 0.0:
                certified[i] = 0.0
                continue
            scale = groups[i]["lr"] * eps * ip
            if self.bound_scaling:
                scale /= p[i] * p[i]
            apply_sign_step(self._W[i], self._b[i], d, q, scale, buf=self._abs_buffer(i))
            certified[i] = ip
            self._after_update(i, scale)
        return chosen, [None if d is None else d.norm for d in duals], certified

    def _step_polar(self, p: list[float], groups):
        """q = 2: the polar-factor direction of F eq. (28), certified as in
        :mod:`smoothchain.dsgd.lowrank` (or by an SVD with ``method="svd"``)."""
        K = len(self._layers)
        cache: dict = {}
        self._fac_cache = {}
        chosen = self._choose(p, K, cache)
        certified: list[float | None] = [None] * K
        eps = self.theory_step
        for i in chosen:
            info = cache[i] if i in cache else self._prepare(i, cache)
            update, ip, bound = self._direction(i, info)
            if update is None or not ip > 0.0:
                certified[i] = 0.0
                continue
            scale = groups[i]["lr"] * eps * ip / (bound * bound)
            if self.bound_scaling:
                scale /= p[i] * p[i]
            update(scale)
            certified[i] = ip / bound
            self._after_update(i, scale * bound)
        return chosen, [cache[i][1] if i in cache else None for i in range(K)], certified


def _check_lr(lr) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
