"""Predicted vs measured arithmetic cost of the oracles on a chain (RH Prop. 3.3, Cor. 3.4,
Prop. C.5, Prop. 3.5, Algo. 4), measured with the FLOP formulas of
``torch.utils.flop_counter.FlopCounterMode``.  See ``docs/complexity.md``.

Layers are the RH layers of :func:`smoothchain.oracles.lq.split_layers` (a module owning
parameters followed by the parameter-free modules after it).  For layer l, with batch size m,
delta_{l-1}, delta_l the sizes of its input and output over the batch and rho_l its number of
parameters:

* s_beta (RH Def. C.3, Fact C.4): multiplications of the bi-affine product -- m d (d_in + 1) for
  a linear layer with a bias (d~ = d_in + 1, RH (8)), m d d_in without; m n_p n_f s_f for a
  convolution (n_p output positions, n_f filters, s_f = in-channels / groups x kernel entries,
  RH (9));
* s_beta_v: the bias of a convolution, m n_p n_f (the "n_p n_f m" of RH Cor. 3.4); 0 for a
  linear layer, whose bias is in d~;
* s_a: the sparsity of the non-linear part (Def. C.3), the entries of the input of each
  parameter-free module that is not a reshape (element-wise activation: m d_l, RH after Fact
  C.4; average pooling: its input entries);
* s'_beta (``s_beta_mults``): s_beta without the bias column, the multiplications of the matrix
  product or convolution alone.

Predictions per layer:

* ``prop_3_3_backward`` = 2 (delta_{l-1} delta_l + rho_l delta_l): RH Prop. 3.3, dense layer
  Jacobians (no structure), in RH's unit (one addition or one multiplication);
* ``cor_3_4_backward``: RH Cor. 3.4, 2 m d_l (d_{l-1} + 1) for a linear layer,
  (2 n_p n_f s_f + n_p n_f + d_l) m for a convolution (d_l = its output entries per example);
* ``prop_c5_backward`` = s_a + 2 s_beta + s_beta_v (+ s_beta_z = 0 here): RH Prop. C.5;
* ``forward_flops`` = 2 s'_beta and ``backward_flops`` = 4 s'_beta: the same products in
  FlopCounterMode's convention (2 FLOPs per multiply-add, only matrix products and
  convolutions, bias additions and element-wise operations not counted); the backward pass
  computes the products of Prop. C.5's proof, grad wrt v (2 s'_beta) and wrt z (2 s'_beta).

:func:`layer_costs` runs each layer alone (input and parameters requiring gradients, as in RH
Algo. 2, which computes lambda_0 too) and records its measured forward and backward FLOPs.

Whole steps (:func:`step_costs`, FLOPs):

* gradient (Prop. C.2: one forward, one backward): sum of forward + backward, less the first
  layer's product for grad wrt x (2 s'_beta_1): lambda_0 is not needed and not computed;
* Gauss-Newton by the dual (Prop. 3.5): the forward pass, then per backward call (Algo. 2) the
  backward less 2 s'_beta_1, per linearisation call a ``torch.func.jvp`` = primal forward (2 s')
  + tangent products (4 s' per layer: torch's forward-mode formula for a linear map or a
  convolution forms both tangent products, also at the first layer whose input tangent is 0);
  the calls are those counted by the oracle (<= 2q + 1);
* Newton by DP (Algo. 4 as in ``oracles.lq``): the forward pass; A_l, B_l by delta_l vmapped
  layer vjps (4 s' each; 2 s' at the first layer, where A_1 is not needed); the
  lambda-contracted layer Hessians by ``torch.func.hessian`` (forward over reverse) on
  rho_l + delta_{l-1} basis directions (rho_1 at the first layer), each needing 8 s' (4 s' at
  the first layer: a direction moves v or z, not both, so 4 of the 6 tangent products are
  non-zero) plus 2 delta_l for the tangent of lambda^T(.), and 6 s' for the primal pass; the
  Riccati products of Algo. 4 lines 14-22 as ``oracles.lq._riccati`` forms them (B_l^T C_l B_l;
  for l > 1 also C_l A_l, B_l^T C_l A_l, N^T K_l, A_l^T C_l A_l; 2 a b c FLOPs for an
  (a x b)(b x c) product), a failed pass (gamma halved) stopping after B_l^T C_l B_l at the
  first stage that is not positive definite.
  Cholesky factorisations and triangular solves (rho^3 / 3 + 2 rho^2 (delta_{l-1} + 1) per
  stage) are reported apart as ``uncounted``: FlopCounterMode has no formula for them.
  The measured assembly can exceed the prediction by up to 1.5x: for convolutions the batching
  rules of ``torch.func`` also evaluate the two vanishing tangent products (docs/complexity.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from .oracles import gradient_step
from .losses import loss_function
from .oracles.autodiff import OracleCounter
from .oracles.dual import gauss_newton_dual
from .oracles.lq import assemble_lq, solve_lq, split_layers

__all__ = ["LayerCost", "FlopCount", "layer_costs", "riccati_flops", "step_costs",
           "complexity_report"]

_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)


@dataclass(frozen=True)
class LayerCost:
    index: int
    name: str
    kind: str                # "linear" or "conv2d"
    m: int
    delta_in: int
    delta_out: int
    rho: int
    s_beta: int              # RH Fact C.4 (bias column included for linear layers)
    s_beta_v: int            # convolution bias
    s_a: int                 # sparsity of the non-linear part
    s_beta_mults: int        # s'_beta: multiplications of the product, no bias
    prop_3_3_backward: int   # RH Prop. 3.3, RH units
    cor_3_4_backward: int    # RH Cor. 3.4, RH units
    prop_c5_backward: int    # RH Prop. C.5, RH units
    forward_flops: int       # predicted, FlopCounterMode convention
    backward_flops: int      # predicted, FlopCounterMode convention
    measured_forward: int
    measured_backward: int


class _NoModuleTracking(ModuleTracker):
    """A :class:`~torch.utils.module_tracker.ModuleTracker` that installs no hooks: its
    ``parents`` stay ``{"Global"}``, so a FlopCounterMode using it keeps global totals only."""

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


class FlopCount:
    """Total FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (its dispatch mode and
    per-operator formulas), without its per-module breakdown.

    FlopCounterMode's default module tracker registers gradient hooks on every module input that
    requires grad, and these fail under ``torch.autograd.grad`` when that input is a leaf -- as
    inside the ``torch.func.vjp`` closures of the oracles ("A leaf node was passed to
    _will_engine_execute_node", pytorch/pytorch#131753).  Only the hierarchy needs the tracker, so
    the mode here gets one that tracks nothing (its public ``mod_tracker``); the totals are the
    mode's own.  ``tests/test_complexity.py`` checks them against a stock FlopCounterMode on plain
    autograd.  ``total`` is the running total (also after the ``with`` block)."""

    def __init__(self):
        self._mode = FlopCounterMode(display=False)
        if not isinstance(getattr(self._mode, "mod_tracker", None), ModuleTracker):
            raise RuntimeError("this torch's FlopCounterMode has no ModuleTracker `mod_tracker`; "
                               "smoothchain.complexity.FlopCount needs one to replace")
        self._mode.mod_tracker = _NoModuleTracking()

    @property
    def total(self) -> int:
        return int(self._mode.get_total_flops())

    def __enter__(self) -> "FlopCount":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _flops(fn) -> tuple[int, object]:
    with FlopCount() as counter:
        out = fn()
    return counter.total, out


def _products(mod: nn.Module, z_in: torch.Tensor, pre: torch.Tensor) -> tuple[str, int, int, int]:
    """(kind, s_beta, s_beta_v, s'_beta) of a layer's parametrised module (RH Fact C.4)."""
    m = z_in.shape[0]
    if isinstance(mod, nn.Linear):
        rows = z_in[..., 0].numel()   # nn.Linear on (m, ..., d_in): extra dims act like batch
        mults = rows * mod.out_features * mod.in_features
        return "linear", mults + (rows * mod.out_features if mod.bias is not None else 0), 0, mults
    if isinstance(mod, nn.Conv2d):
        n_p = pre[0, 0].numel()
        s_f = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        mults = m * n_p * mod.out_channels * s_f
        return "conv2d", mults, (m * n_p * mod.out_channels if mod.bias is not None else 0), mults
    raise ValueError(f"no sparsity formula (RH Fact C.4) for {type(mod).__name__}; "
                     "supported layers: nn.Linear, nn.Conv2d")


def layer_costs(model: nn.Module, x: torch.Tensor) -> list[LayerCost]:
    """Per-layer predicted and measured forward/backward costs of the chain on the batch x."""
    chain = split_layers(model)
    z = chain.input(x).detach()
    m = z.shape[0]
    names = {id(mod): name for name, mod in model.named_modules()}
    out: list[LayerCost] = []
    for index, layer in enumerate(chain.layers, start=1):
        v = layer.vector().detach()
        first = layer.modules[0]
        with torch.no_grad():
            pre = layer.function(v, z)   # the first module alone: its pre-activation
        kind, s_beta, s_beta_v, mults = _products(first, z, pre)
        s_a, h = 0, pre
        for mod in layer.modules[1:]:
            if not isinstance(mod, _RESHAPES):
                s_a += h.numel()
            h = mod(h)
        v_req = v.clone().requires_grad_()
        z_req = z.clone().requires_grad_()
        fwd, out_t = _flops(lambda: layer.apply(v_req, z_req))
        bwd, _ = _flops(lambda: torch.autograd.grad(out_t, (v_req, z_req), torch.ones_like(out_t)))
        d_in, d_out, rho = z.numel(), out_t.numel(), v.numel()
        if kind == "linear":
            cor = 2 * m * (d_out // m) * (d_in // m + 1)
        else:
            cor = 2 * mults + m * pre[0].numel() + m * out_t[0].numel()
        out.append(LayerCost(
            index=index, name=names.get(id(first), type(first).__name__), kind=kind, m=m,
            delta_in=d_in, delta_out=d_out, rho=rho, s_beta=s_beta, s_beta_v=s_beta_v, s_a=s_a,
            s_beta_mults=mults, prop_3_3_backward=2 * (d_in * d_out + rho * d_out),
            cor_3_4_backward=cor, prop_c5_backward=s_a + 2 * s_beta + s_beta_v,
            forward_flops=2 * mults, backward_flops=4 * mults,
            measured_forward=fwd, measured_backward=bwd))
        z = out_t.detach()
    return out


def riccati_flops(layers: list[LayerCost], failed_at: tuple[int, ...] = ()) -> tuple[int, int]:
    """(counted, uncounted) operations of the Riccati passes of ``oracles.lq.solve_lq``.

    ``failed_at``: for each failed pass, the 0-based layer whose stage was not positive definite
    (``LQSolution.failed_at``); then one complete pass.  Counted: matrix products (FLOPs);
    uncounted: Cholesky rho^3 / 3 and triangular solves 2 rho^2 per right-hand side."""

    def stage(l: int, complete: bool) -> tuple[int, int]:
        c = layers[l]
        d_in, d, rho = c.delta_in, c.delta_out, c.rho
        counted = 2 * rho * d * d + 2 * rho * d * rho          # (B^T C) B
        uncounted = rho ** 3 // 3
        if complete:
            uncounted += 2 * rho * rho                          # k_l
            if l > 0:
                counted += 2 * d * d * d_in                     # C A
                counted += 2 * rho * d * d_in                   # B^T (C A)
                counted += 2 * d_in * rho * d_in                # N^T K
                counted += 2 * d_in * d * d_in                  # A^T (C A)
                uncounted += 2 * rho * rho * d_in               # K_l
        return counted, uncounted

    counted = uncounted = 0
    tau = len(layers)
    for stop in list(failed_at) + [None]:
        for l in reversed(range(tau)):
            if stop is not None and l < stop:
                break
            a, b = stage(l, stop is None or l > stop)
            counted, uncounted = counted + a, uncounted + b
    return counted, uncounted


def step_costs(model: nn.Module, x: torch.Tensor, y, *, loss: str, layers: list[LayerCost],
               l2: float = 0.0, gamma: float = 1.0) -> dict:
    """Predicted and measured FLOPs of one gradient, Gauss-Newton (dual) and Newton (DP) step."""
    fwd = sum(c.forward_flops for c in layers)
    first = layers[0].s_beta_mults
    bwd_chain = sum(c.backward_flops for c in layers) - 2 * first    # no gradient wrt x
    jvp = fwd + sum(4 * c.s_beta_mults for c in layers)               # primal + both tangents

    grad_measured, _ = _flops(lambda: gradient_step(model, x, y, loss=loss, l2=l2, gamma=gamma))
    # gauss_newton_step(method="dual") is gauss_newton_dual; called directly for its counter
    counter = OracleCounter()
    f = loss_function(loss, y, x)
    gn_measured, _ = _flops(lambda: gauss_newton_dual(model, x, f, l2, gamma, counter))
    gn_pred = fwd + counter.backward_calls * bwd_chain + counter.linearize_calls * jvp

    nt_counter = OracleCounter()
    asm_measured, lq = _flops(lambda: assemble_lq(model, x, f, l2, "newton", nt_counter))
    ric_measured, sol = _flops(lambda: solve_lq(lq, gamma))
    assembly = 0
    for i, c in enumerate(layers):
        s = c.s_beta_mults
        assembly += c.delta_out * (4 * s if i > 0 else 2 * s)          # A_l (l > 1), B_l
        directions = c.rho + (c.delta_in if i > 0 else 0)               # Hessian of lambda^T phi_l
        assembly += directions * ((8 * s if i > 0 else 4 * s) + 2 * c.delta_out) + 6 * s
    riccati, uncounted = riccati_flops(layers, sol.failed_at)
    return {
        "gradient": {"predicted": fwd + bwd_chain, "measured": grad_measured, "oracle_calls": 1},
        "gauss_newton_dual": {
            "predicted": gn_pred, "measured": gn_measured, "oracle_calls": counter.calls,
            "backward_calls": counter.backward_calls, "linearize_calls": counter.linearize_calls,
            "bound_2q_plus_1": 2 * int(layers[-1].delta_out) + 1},
        "newton_dp": {
            "predicted": fwd + assembly + riccati, "measured": asm_measured + ric_measured,
            "oracle_calls": nt_counter.calls, "predicted_assembly": fwd + assembly,
            "measured_assembly": asm_measured, "riccati_passes": sol.tries,
            "failed_at": list(sol.failed_at), "predicted_riccati": riccati,
            "measured_riccati": ric_measured, "uncounted_riccati": uncounted,
            "gamma_used": sol.gamma},
    }


def complexity_report(model: nn.Module, input_shape, batch_size: int = 4, *,
                      loss: str = "cross-entropy", seed: int = 0, l2: float = 0.0,
                      gamma: float = 1.0, dtype: torch.dtype = torch.float64,
                      steps: bool = True) -> dict:
    """Per-layer and per-step predicted vs measured costs on a random batch of ``batch_size``.

    The model is converted to ``dtype`` (FLOP counts do not depend on it; float64 lets the dual
    Gauss-Newton CG reach its tolerance).  ``steps=False`` skips the whole-step measurements."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    x = torch.rand((batch_size,) + tuple(input_shape), generator=gen, dtype=dtype)
    with torch.no_grad():
        out = model(x)
    if loss == "cross-entropy":
        if out.dim() != 2:
            raise ValueError(f"cross-entropy needs (batch, classes) outputs, got {tuple(out.shape)}")
        y = torch.randint(0, out.shape[1], (batch_size,), generator=gen)
    elif loss == "square":
        y = torch.rand(out.shape, generator=gen, dtype=dtype)
    else:
        raise ValueError(f"loss must be 'cross-entropy' or 'square', got {loss!r}")
    layers = layer_costs(model, x)
    doc = {"batch_size": batch_size, "input_shape": list(input_shape), "loss": loss, "l2": l2,
           "gamma": gamma, "parameters": sum(c.rho for c in layers), "q": out.numel(),
           "layers": [asdict(c) for c in layers]}
    if steps:
        doc["steps"] = step_costs(model, x, y, loss=loss, layers=layers, l2=l2, gamma=gamma)
    return doc
