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

Speed (issue item 4, ``docs/dsgd.md`` section "Speed").  For q = 2 the optimizer registers a
forward hook on every ``nn.Linear`` that records the layer input X and, through a tensor hook,
the gradient Delta at its output, so g_i = Delta^T [X | 1] has rank <= m (the batch) and the
nuclear norm and polar factor come from m x m matrices.  The records are checked against the
true ``.grad`` with a random probe (a stale record falls back to the dense route) and are
cleared by ``zero_grad`` and ``step``.  Weight norms for q = 1, inf are exact every step; q = 2
layers keep the certified bound
||W + D||_2 <= ||W||_2 + ||D||_2 after each of our updates and are recomputed exactly every
``norm_refresh`` steps or whenever the parameter was changed by anything else (detected by the
tensor's version counter).  ``norm_refresh=1`` makes every q = 2 norm exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..dsgd.bounds import (
    check_data,
    check_data_bound,
    layer_bounds_from_norms,
    layer_matrix,
    parse_model,
)
from ..dsgd.lowrank import certified_direction, gamma, polar_core, unit_roundoff
from ..dsgd.norms import check_q, duality_map, spectral_norm
from ..dsgd.rates import stochastic_step_size, variance_bound

__all__ = ["DSGD"]

VARIANTS = ("greedy", "all", "random", "sequential")
MODES = ("batch", "stochastic")
#: layers with min(r, c) up to this get exact nuclear norms in the greedy screening at once
EXACT_NORM_MAX = 64


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
        norm_refresh: exact recomputation period of the incremental q = 2 weight-norm bounds.

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
            lin = self._layers[i].linear
            vers = (lin.weight._version, lin.bias._version if self._layers[i].bias else 0)
            self._norm_cache[i] = (float(c[0]), vers[0], vers[1], int(c[1]))
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
            return val * (1.0 + gamma(r + 1, torch.float64))
        if self.q == math.inf:
            rows = W.abs().sum(dim=1, dtype=torch.float64)
            if b is not None:
                rows = rows + b.abs().to(torch.float64)
            return float(rows.max()) * (1.0 + gamma(c + 1, torch.float64))
        M = layer_matrix(spec)
        # sqrt(lambda_max) of a float64 Gram matrix; eigvalsh is backward stable with error
        # ~ n u ||Gram||, covered by the relative slack below
        return spectral_norm(M) * (1.0 + 4 * (min(r, c) + 1) * u)

    def _norm_bound(self, i: int) -> float:
        spec = self._layers[i]
        lin = spec.linear
        vers = (lin.weight._version, lin.bias._version if spec.bias else 0)
        cached = self._norm_cache[i]
        exact_each_step = self.q != 2.0  # q = 1, inf: one cheap reduction
        if cached is not None and not exact_each_step and cached[1:3] == vers and cached[3] < self.norm_refresh:
            return cached[0]
        val = self._exact_norm(spec)
        self._norm_cache[i] = (val, vers[0], vers[1], 0)
        return val

    def _after_update(self, i: int, step_norm: float) -> None:
        """Certified increment ||W - s Q|| <= ||W|| + s ||Q|| (+ rounding of the stored result)."""
        cached = self._norm_cache[i]
        spec = self._layers[i]
        lin = spec.linear
        vers = (lin.weight._version, lin.bias._version if spec.bias else 0)
        if cached is None:
            return
        r, c = lin.weight.shape[0], lin.weight.shape[1] + (1 if spec.bias else 0)
        u = unit_roundoff(lin.weight.dtype)
        fac = 1.0 + 3 * u * (math.sqrt(min(r, c)) if self.q == 2.0 else 1.0)
        self._norm_cache[i] = ((cached[0] + step_norm) * fac, vers[0], vers[1], cached[3] + 1)

    def layer_bounds(self) -> list[float]:
        """p_i(w) of F Prop. 4.3 at the current weights (F eq. 23), from certified norm bounds."""
        norms = [0.0] + [self._norm_bound(i) for i in range(1, len(self._layers))]
        return layer_bounds_from_norms(self._layers, norms, self.q, self.data_bound)

    def check_data(self, x, z=None, *, rescale: bool = False):
        """F Assumption 4.1 (ii) for this optimizer's ``data_bound`` (see ``bounds.check_data``)."""
        return check_data(x, z, self.data_bound, rescale=rescale)

    # ----------------------------------------------------------------------------------------
    # per-layer dual norms and directions
    def _grads(self, i: int):
        spec = self._layers[i]
        lin = spec.linear
        GW = lin.weight.grad
        if GW is None:
            GW = torch.zeros_like(lin.weight)
        gb = None
        if spec.bias:
            gb = lin.bias.grad
            if gb is None:
                gb = torch.zeros_like(lin.bias)
        return GW.detach(), (gb.detach() if gb is not None else None)

    def _prepare(self, i: int, cache: dict):
        """Dual norm ||g_i||_* (F eq. 26) and what the direction needs, cached per step."""
        if i in cache:
            return cache[i]
        GW, gb = self._grads(i)
        if self.q == 1.0:  # columns of [W | b]: sum_j max_i |G_ij|
            N = float(GW.abs().amax(dim=0).sum(dtype=torch.float64))
            if gb is not None:
                N += float(gb.abs().max())
            info = ("sign", N, None, None, GW, gb)
        elif self.q == math.inf:  # rows of [W | b]: sum_i max_j |G_ij|
            vals = GW.abs().amax(dim=1)
            if gb is not None:
                vals = torch.maximum(vals, gb.abs())
            N = float(vals.sum(dtype=torch.float64))
            info = ("sign", N, None, None, GW, gb)
        elif self.method == "svd":
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

    def _direction(self, i: int, info):
        """(update function, ip, bound): the step s * Q is applied by ``update(s)``."""
        kind, N, a, b, GW, gb = info
        spec = self._layers[i]
        lin = spec.linear
        if kind == "sign":
            ip = N * (1.0 - gamma(GW.shape[0] + GW.shape[1] + 2, torch.float64))
            if self.q == 1.0:  # F eq. (27): sign at the first arg max of each column
                vals, idx = GW.abs().max(dim=0)
                cols = torch.arange(GW.shape[1])
                sgn = torch.where(GW[idx, cols] >= 0, 1.0, -1.0).to(GW.dtype)
                bi = int(gb.abs().argmax()) if gb is not None else None

                def update(s):
                    lin.weight.index_put_((idx, cols), -s * sgn, accumulate=True)
                    if bi is not None:
                        lin.bias[bi] -= s * (1.0 if float(gb[bi]) >= 0 else -1.0)
            else:  # F eq. (29): sign at the first arg max of each row (the bias column last)
                vals, idx = GW.abs().max(dim=1)
                rows = torch.arange(GW.shape[0])
                wsgn = torch.where(GW[rows, idx] >= 0, 1.0, -1.0).to(GW.dtype)
                use_b = None
                if gb is not None:
                    use_b = gb.abs() > vals
                    bsgn = torch.where(gb >= 0, 1.0, -1.0).to(GW.dtype)
                    wsgn = torch.where(use_b, torch.zeros_like(wsgn), wsgn)
                    bsgn = torch.where(use_b, bsgn, torch.zeros_like(bsgn))

                def update(s):
                    lin.weight.index_put_((rows, idx), -s * wsgn, accumulate=True)
                    if use_b is not None:
                        lin.bias.add_(bsgn, alpha=-s)
            return update, ip, 1.0
        if kind == "svd":
            rho = a  # F eq. (28), float64; Q = rho / N
            if N <= 0:
                return None, 0.0, 1.0
            Q = rho / N
            bound = spectral_norm(Q) * (1.0 + 8 * unit_roundoff(torch.float64) * (min(Q.shape) + 1))
            G = layer_matrix(spec, grad=True).to(torch.float64)
            ip = float((G * Q).sum()) * (1.0 - gamma(G.numel(), torch.float64))
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

    def _choose(self, p: list[float], K: int, cache: dict) -> list[int]:
        if self.variant == "greedy":
            candidates = list(range(K))
            if self.q == 2.0 and self.method != "svd" and K > 1:
                candidates = self._screen(p, cache)
            if len(candidates) == 1:
                return candidates
            ratios = {i: self._prepare(i, cache)[1] / p[i] for i in candidates}
            return [max(candidates, key=lambda i: (ratios[i], -i))]
        if self.variant == "all":
            return list(range(K))
        if self.variant == "random":
            return [int(torch.randint(K, (1,), generator=self._gen).item())]
        state = self.state[self._layers[0].linear.weight]
        t = state.get("dsgd_step", 0)
        return [t % K]

    @torch.no_grad()
    def step(self, closure=None):
        """One step of F Algo. 4.1; ``closure`` (optional) re-evaluates the objective, calls
        ``backward()`` and returns the loss, which ``step`` returns."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_lr(group["lr"])
        K = len(self._layers)
        p = self.layer_bounds()
        cache: dict = {}
        self._fac_cache = {}
        chosen = self._choose(p, K, cache)
        certified: list[float | None] = [None] * K
        for i in chosen:
            info = self._prepare(i, cache)
            update, ip, bound = self._direction(i, info)
            if update is None or not ip > 0.0:
                certified[i] = 0.0
                continue
            scale = self.param_groups[i]["lr"] * self.theory_step * ip / bound**2
            if self.bound_scaling:
                scale /= p[i] ** 2
            update(scale)
            certified[i] = ip / bound
            self._after_update(i, scale * bound)
        state = self.state[self._layers[0].linear.weight]
        state["dsgd_step"] = state.get("dsgd_step", 0) + 1
        self._clear_records()
        self.last_layers = [i + 1 for i in chosen]
        self.last_p = p
        self.last_dual_norms = [cache[i][1] if i in cache else None for i in range(K)]
        self.last_certified = certified
        return loss


def _check_lr(lr) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
