"""Predicted vs measured arithmetic cost of the oracles on a chain (RH Prop. 3.3, Cor. 3.4,
Prop. C.5, Prop. 3.5, Algo. 4), measured with ``torch.utils.flop_counter.FlopCounterMode``.

Layers are the RH layers of :func:`smoothchain.oracles.lq.split_layers` (a module owning
parameters followed by the parameter-free modules after it).  For layer l, with batch size m,
delta_{l-1}, delta_l the sizes of its input and output over the batch and rho_l its number of
parameters:

* s_beta (RH Def. C.3, Fact C.4): multiplications of the bi-affine product -- m d_out d~ for a
  linear layer (d~ = d_in + 1 with a bias, RH (8)), m n_p n_f s_f for a convolution (n_p output
  positions, n_f filters, s_f = in-channels x kernel entries, RH (9));
* s_beta_v: the bias of a convolution, m n_p n_f (RH Cor. 3.4's "n_p n_f m"); 0 for a linear
  layer, whose bias is in d~;
* s_a: the sparsity of the non-linear part, the entries of each parameter-free module's input
  (element-wise activations: m d_l; average pooling: its input entries; reshapes: 0).

Predictions, in RH's unit (one addition or multiplication; the sparsity counts multiplications):

* ``prop_3_3_backward`` = 2 (delta_{l-1} delta_l + rho_l delta_l) (RH Prop. 3.3: dense layer
  Jacobians, no structure);
* ``prop_c5_backward`` = s_a + 2 s_beta + s_beta_v + s_beta_z (RH Prop. C.5; Cor. 3.4 for the
  fully-connected and convolutional cases; s_beta_z = 0 here);

and in FLOPs as ``FlopCounterMode`` counts them (2 per multiply-add, only matrix products and
convolutions, bias additions and element-wise operations not counted), with s'_beta = s_beta
without the bias column:

* ``forward_flops`` = 2 s'_beta (computing B[v, z, .]),
* ``backward_flops`` = 4 s'_beta (the two products of Prop. C.5's proof: grad wrt z and wrt v).

``measure`` runs each layer alone (input and parameters both requiring gradients, as in RH
Algo. 2 which computes lambda_0 too) and records the forward and backward FLOPs.

Whole steps (totals, FLOPs; :func:`step_costs`):

* gradient (= one forward, one backward, RH Prop. C.2): forward + backward, except that the
  first layer's input needs no gradient (autograd skips 2 s'_beta_1 of the backward);
* Gauss-Newton by the dual (Prop. 3.5): the forward pass, then per backward call the backward
  above and per linearisation call a jvp = primal forward + tangents (2 s'_beta + 4 s'_beta,
  2 s'_beta for the first layer whose input tangent is 0); the calls are those counted by the
  oracle (<= 2q + 1);
* Newton by DP (Algo. 4 as in ``oracles.lq``): forward; A_l, B_l materialised by delta_l layer
  vjps (4 s'_beta each); the lambda-contracted layer Hessians by ``torch.func.hessian`` on
  rho_l + delta_{l-1} directions (rho_1 for the first layer), 12 s'_beta per direction (a tangent
  forward 4 s'_beta and a tangent backward 8 s'_beta) plus one primal forward and backward
  (6 s'_beta); the Riccati matrix products of Algo. 4 lines 20-21 (C_l A_l, B_l^T C_l B_l,
  B_l^T C_l A_l, N^T K_l, A_l^T C_l A_l: 2 a b c FLOPs for an (a x b)(b x c) product).
  Cholesky factorisations and triangular solves (rho_l^3 / 3 + 2 rho_l^2 (delta_{l-1} + 1))
  are reported apart as ``uncounted``: FlopCounterMode has no formula for them.

See ``docs/complexity.md`` for where and why the predictions and the measurements differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

FLOP_REGISTRY = FlopCounterMode().flop_registry

from .oracles import gradient_step
from .oracles.autodiff import OracleCounter, make_loss
from .oracles.dual import gauss_newton_dual
from .oracles.lq import ChainLayer, assemble_lq, solve_lq, split_layers

__all__ = ["LayerCost", "layer_costs", "step_costs", "complexity_report"]


@dataclass(frozen=True)
class LayerCost:
    index: int
    name: str
    m: int
    delta_in: int
    delta_out: int
    rho: int
    s_beta: int              # RH Fact C.4 (bias column included for linear layers)
    s_beta_v: int            # convolution bias
    s_a: int                 # sparsity of the non-linear part
    s_beta_mults: int        # s'_beta: multiplications of the product, no bias
    prop_3_3_backward: int   # RH Prop. 3.3, RH units
    prop_c5_backward: int    # RH Prop. C.5 / Cor. 3.4, RH units
    forward_flops: int       # predicted, FlopCounterMode convention
    backward_flops: int      # predicted, FlopCounterMode convention
    measured_forward: int
    measured_backward: int


class _FlopCount(TorchDispatchMode):
    """FlopCounterMode's per-operator formulas (``torch.utils.flop_counter``) without its module
    tracker, whose global hooks clash with ``torch.func.vjp`` closures; totals only."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_REGISTRY.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def _flops(fn) -> tuple[int, object]:
    with _FlopCount() as counter:
        out = fn()
    return counter.total, out


def _products(layer: ChainLayer, z_in: torch.Tensor, z_out_pre: torch.Tensor) -> tuple[int, int, int]:
    """(s_beta, s_beta_v, s'_beta) of the layer's parametrised module (RH Fact C.4)."""
    mod, m = layer.modules[0], z_in.shape[0]
    if isinstance(mod, nn.Linear):
        mults = m * mod.out_features * mod.in_features
        lead = z_in[..., 0].numel() // m   # nn.Linear on (m, ..., d_in): extra dims act like batch
        mults *= lead
        return mults + (m * lead * mod.out_features if mod.bias is not None else 0), 0, mults
    if isinstance(mod, nn.Conv2d):
        n_p = z_out_pre[0, 0].numel()
        s_f = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        mults = m * n_p * mod.out_channels * s_f
        return mults, (m * n_p * mod.out_channels if mod.bias is not None else 0), mults
    raise ValueError(f"no sparsity formula (RH Fact C.4) for {type(mod).__name__}; "
                     "supported: nn.Linear, nn.Conv2d")


def layer_costs(model: nn.Module, x: torch.Tensor) -> list[LayerCost]:
    """Per-layer predicted and measured forward/backward costs of the chain on the batch x."""
    chain = split_layers(model)
    z = chain.input(x).detach()
    m = z.shape[0]
    out: list[LayerCost] = []
    names = {id(mod): name for name, mod in model.named_modules()}
    for index, layer in enumerate(chain.layers, start=1):
        v = layer.vector().detach()
        first = layer.modules[0]
        pre = _first_output(layer, v, z)
        s_beta, s_beta_v, mults = _products(layer, z, pre)
        s_a, h = 0, pre
        for mod in layer.modules[1:]:
            if not isinstance(mod, (nn.Flatten, nn.Unflatten, nn.Identity)):
                s_a += h.numel()
            h = mod(h)
        v_req = v.clone().requires_grad_()
        z_req = z.clone().requires_grad_()
        fwd, out_t = _flops(lambda: layer.apply(v_req, z_req))
        lam = torch.ones_like(out_t)
        bwd, _ = _flops(lambda: torch.autograd.grad(out_t, (v_req, z_req), lam))
        d_in, d_out, rho = z.numel(), out_t.numel(), v.numel()
        out.append(LayerCost(
            index=index, name=names.get(id(first), type(first).__name__), m=m, delta_in=d_in,
            delta_out=d_out, rho=rho, s_beta=s_beta, s_beta_v=s_beta_v, s_a=s_a,
            s_beta_mults=mults, prop_3_3_backward=2 * (d_in * d_out + rho * d_out),
            prop_c5_backward=s_a + 2 * s_beta + s_beta_v, forward_flops=2 * mults,
            backward_flops=4 * mults, measured_forward=fwd, measured_backward=bwd))
        z = out_t.detach()
    return out


def _first_output(layer: ChainLayer, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    from torch.func import functional_call

    with torch.no_grad():
        return functional_call(layer.modules[0], dict(zip(layer.names, layer.unflatten(v))), (z,))


def _riccati_flops(layers: list[LayerCost]) -> tuple[int, int]:
    """Matrix-product FLOPs of Algo. 4 lines 20-21 as in ``oracles.lq._riccati``, and the
    Cholesky / triangular-solve operations that FlopCounterMode does not count."""
    counted = uncounted = 0
    for i, c in enumerate(layers):
        d_in, d, rho = c.delta_in, c.delta_out, c.rho
        counted += 2 * d * d * d_in            # C A
        counted += 2 * rho * d * d + 2 * rho * d * rho   # B^T C B
        counted += 2 * rho * d * d_in          # B^T (C A)
        counted += 2 * d_in * rho * d_in       # N^T K
        counted += 2 * d_in * d * d_in         # A^T (C A)
        uncounted += rho ** 3 // 3 + 2 * rho * rho * (d_in + 1)
    return counted, uncounted


def step_costs(model: nn.Module, x: torch.Tensor, y, *, loss: str, layers: list[LayerCost],
               l2: float = 0.0, gamma: float = 1.0) -> dict:
    """Predicted and measured FLOPs of one gradient, Gauss-Newton (dual) and Newton (DP) step."""
    fwd = sum(c.forward_flops for c in layers)
    first = layers[0].s_beta_mults
    bwd = sum(c.backward_flops for c in layers)                       # RH Algo. 2, lambda_0 too
    bwd_chain = bwd - 2 * first                                       # no gradient wrt x
    jvp = fwd + sum(4 * c.s_beta_mults for c in layers) - 2 * first    # primal + tangents, z~_0 = 0

    grad_measured, _ = _flops(lambda: gradient_step(model, x, y, loss=loss, l2=l2, gamma=gamma))
    # gauss_newton_step(method="dual") is gauss_newton_dual; called directly for its counter
    counter = OracleCounter()
    gn_measured, _ = _flops(lambda: gauss_newton_dual(model, x, make_loss(loss, y, x), l2, gamma, counter))
    gn_pred = fwd + counter.backward_calls * bwd_chain + counter.linearize_calls * jvp

    f = make_loss(loss, y, x)
    nt_counter = OracleCounter()
    asm_measured, lq = _flops(lambda: assemble_lq(model, x, f, l2, "newton", nt_counter))
    ric_measured, sol = _flops(lambda: solve_lq(lq, gamma))
    assembly = 0
    for i, c in enumerate(layers):
        assembly += c.delta_out * c.backward_flops                       # A_l, B_l
        if i == 0:   # z~_0 = 0: v-Hessian only; tangent forward 2 s', tangent of the v-gradient 2 s'
            assembly += c.rho * 4 * c.s_beta_mults + 4 * c.s_beta_mults
        else:
            assembly += (c.rho + c.delta_in) * 12 * c.s_beta_mults + 6 * c.s_beta_mults
    riccati, uncounted = _riccati_flops(layers)
    return {
        "gradient": {"predicted": fwd + bwd, "measured": grad_measured, "oracle_calls": 1},
        "gauss_newton_dual": {
            "predicted": gn_pred, "measured": gn_measured, "oracle_calls": counter.calls,
            "backward_calls": counter.backward_calls, "linearize_calls": counter.linearize_calls,
            "bound_2q_plus_1": 2 * int(layers[-1].delta_out) + 1},
        "newton_dp": {
            "predicted": fwd + assembly + sol.tries * riccati, "measured": asm_measured + ric_measured,
            "oracle_calls": nt_counter.calls, "predicted_assembly": assembly,
            "measured_assembly": asm_measured, "riccati_passes": sol.tries,
            "predicted_riccati": sol.tries * riccati, "measured_riccati": ric_measured,
            "uncounted_per_pass": uncounted, "gamma_used": sol.gamma},
    }


def complexity_report(model: nn.Module, input_shape, batch_size: int = 4, *, loss: str = "cross-entropy",
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Per-layer and per-step predicted vs measured costs on a random batch of ``batch_size``."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    x = torch.rand((batch_size,) + tuple(input_shape), generator=gen, dtype=dtype)
    with torch.no_grad():
        out = model(x)
    if loss == "cross-entropy":
        y = torch.randint(0, out.shape[1], (batch_size,), generator=gen)
    elif loss == "square":
        y = torch.rand(out.shape, generator=gen, dtype=dtype)
    else:
        raise ValueError(f"loss must be 'cross-entropy' or 'square', got {loss!r}")
    layers = layer_costs(model, x)
    steps = step_costs(model, x, y, loss=loss, layers=layers)
    return {"batch_size": batch_size, "input_shape": list(input_shape), "loss": loss,
            "layers": [asdict(c) for c in layers], "steps": steps}
