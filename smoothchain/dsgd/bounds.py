"""Layer-wise smoothness polynomials p_i(w) of F Prop. 4.3, for mixed widths and biases.

Network (F Sec. 4): y^0 = x, y^i = sigma_i([W_i | b_i] [y^{i-1}; 1]) for i = 1..K, objective
f(w) = mean_j ||y^K(w; x_j) - z_j||_2^2 (F eqs. 21-22, no 1/2).  Every layer ends with a bounded
activation (F Assumption 4.1 i), inputs and targets satisfy ||x||_inf, ||z||_inf <= D
(``data_bound``; F Assumption 4.1 ii has D = 1).  Layer matrices carry the operator norm
||.||_q of (R^{n_{i-1}(+1)}, ||.||_q) -> (R^{n_i}, ||.||_q) (F Assumption 4.2).

Per layer i write alpha_i = ||sigma_i'||_inf, beta_i = ||sigma_i''||_inf, z_i = ||[W_i | b_i]||_q
and c_i = sup ||[y^{i-1}; 1]||_q (the q-norm of the layer's augmented input).  Then

* r^(i) = prod_{j=i+1..K} alpha_j z_j                     (bound on ||d y^K / d y^i||, F eq. 59)
* v^(K) = 0,  v^(i-1) = alpha_i^2 z_i^2 v^(i) + beta_i z_i^2 r^(i)
                                                         (bound on ||d^2 y^K / d (y^i)^2||, F 60)
* s_i = c_i^2 (d_{q,2} alpha_i^2 (r^(i))^2 + d_{q,1} alpha_i^2 v^(i) + d_{q,1} beta_i r^(i))
* p_i(w) = sqrt(s_i + 1)                                  (F eq. 23)

and ||d^2 f / d w_i^2 (w)||_q <= s_i < p_i(w)^2.  The backward recursion for v is the expansion
of F's forward recursion v_n = beta z_n^2 r_{n-1}^2 + alpha z_n v_{n-1} read from the other end
(both equal sum_m beta_m z_m^2 (prod_{j<m} alpha_j z_j)^2 prod_{j>m} alpha_j z_j); with one
activation and equal widths it is exactly F's p_i.

Which dimension enters which constant (F Table 1 assumes n_0 = ... = n_K = n):

* c_i is the bound on ||y^{i-1}||_q in (61)-(62): the *input width of layer i*, plus one for the
  bias' constant input.  Hidden inputs lie in [-1, 1]:  c_i = (n_{i-1} + [bias])^{1/q}
  (q = inf: 1).  The first layer sees data: c_1 = (n_0 D^q + [bias])^{1/q}
  (q = inf: max(D, [bias])).  With D = 1 and no bias this is Table 1's c_q = n^{1/q}.
* d_{q,1} = sup ||dJ/dy||_{q,*} = sup ||2 (y - z)||_{q'} and d_{q,2} = ||d^2 J/dy^2||_q
  (the bilinear norm of 2 I on (R^{n_K}, ||.||_q)) concern the loss J(y) = ||y - z||^2 on the
  *output width n_K*:  |y_k - z_k| <= 1 + D gives d_{q,1} = 2 (1 + D) n_K^{1 - 1/q}, and
  d_{q,2} = 2 n_K^{max(0, 1 - 2/q)}.  With D = 1: Table 1 (4, 4 sqrt n, 4n; 2, 2, 2n).
* the weights' operator norms z_j (rectangular matrices, any widths) handle everything in
  between; a bias column only enlarges z_j (||[W | b]||_q >= ||W||_q, restriction to the
  subspace whose last coordinate is 0), so the chain bounds remain valid with [W | b].

Activation constants (F leaves them symbolic; these are the exact suprema):
sigmoid: |sigma| <= 1, alpha = 1/4, beta = 1/(6 sqrt 3) (at sigma = 1/2 -+ 1/(2 sqrt 3));
tanh: |sigma| <= 1, alpha = 1, beta = 4/(3 sqrt 3) (at tanh = 1/sqrt 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..losses import f_loss_constants, squared_error
from ..components import Elementwise, Sigmoid, Tanh
from ..torch_chain import convert, module_layers
from .norms import check_q, matrix_norm

__all__ = [
    "ACTIVATIONS",
    "activation_constants",
    "ActivationConstants",
    "ChainConstants",
    "LayerSpec",
    "parse_model",
    "input_norm_bound",
    "layer_bounds",
    "layer_bounds_from_norms",
    "layer_matrix",
    "check_data",
    "objective",
    "check_data_bound",
]


@dataclass(frozen=True)
class ActivationConstants:
    """Sup-norm constants of an element-wise activation (F Assumption 4.1 i)."""

    name: str
    bound: float  # ||sigma||_inf, must be <= 1
    d1: float  # ||sigma'||_inf
    d2: float  # ||sigma''||_inf


def activation_constants(component: Elementwise) -> ActivationConstants:
    """F's (||sigma||_inf, ||sigma'||_inf, ||sigma''||_inf) from the activation's own scalar facts
    (:class:`smoothchain.components.Elementwise`, the tight ones: exact sups)."""
    f = component.scalar_facts("tight")
    return ActivationConstants(component.label, f.bound, f.d1, f.d2)


#: The built-in bounded activations (a view of the components' facts); any registered
#: :class:`~smoothchain.components.Elementwise` activation with sup|sigma| <= 1 is accepted too.
ACTIVATIONS: dict[type, ActivationConstants] = {
    type(mod): activation_constants(comp)
    for mod, comp in ((comp.to_torch(), comp) for comp in (Sigmoid(), Tanh()))
}

# modules that leave values unchanged (Flatten is allowed only before the first Linear)
_NEUTRAL = (nn.Identity,)


@dataclass(frozen=True)
class LayerSpec:
    """One layer y = sigma([W | b] [y_prev; 1]) of a parsed model (index is 1-based)."""

    index: int
    linear: nn.Linear
    activation: ActivationConstants
    in_features: int
    out_features: int
    bias: bool


def _activation_constants(mod: nn.Module, width: int) -> ActivationConstants | None:
    parts = convert(mod, (width,))
    if parts is None or len(parts) != 1 or not isinstance(parts[0], Elementwise):
        return None
    return activation_constants(parts[0])


def parse_model(model: nn.Module) -> list[LayerSpec]:
    """Read an ``nn.Sequential`` of (``nn.Linear``, bounded activation) pairs: the layers of
    :func:`smoothchain.torch_chain.module_layers`, checked against F Assumption 4.1 (i).

    ``nn.Flatten`` may precede the first Linear and ``nn.Identity`` may appear anywhere.  Raises
    ``ValueError`` naming the offending module when F Assumption 4.1 (i) fails: an unbounded or
    unsupported module (ReLU, Softplus, ...), a Linear not followed by a bounded activation
    (including a last layer without activation), or two activations in a row.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"DSGD needs an nn.Sequential of nn.Linear layers each followed by a bounded "
            f"activation (F Sec. 4), got {type(model).__name__}")
    parsed = module_layers(model)

    def where(pos: int, mod: nn.Module) -> str:
        return f"module {pos} ({type(mod).__name__})"

    for pos, (_, mod) in enumerate(parsed.pre):
        if not isinstance(mod, _NEUTRAL + (nn.Flatten,)):
            raise ValueError(f"{where(pos, mod)}: activation without a preceding Linear layer")
    if not parsed.layers:
        raise ValueError("the model has no nn.Linear layer")
    layers: list[LayerSpec] = []
    for k, group in enumerate(parsed.layers):
        index, lin = k + 1, group.owner
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{where(group.positions[0], lin)} owns parameters but is not an nn.Linear: "
                             f"DSGD (F Sec. 4) takes nn.Linear layers each followed by a bounded activation")
        rest = [(pos, mod) for pos, (_, mod) in zip(group.positions[1:], group.modules[1:])
                if not isinstance(mod, _NEUTRAL)]
        for j, (pos, mod) in enumerate(rest):
            if isinstance(mod, nn.Flatten):
                raise ValueError(f"{where(pos, mod)}: Flatten is only supported before the first Linear")
            if j > 0:
                raise ValueError(f"{where(pos, mod)}: activation without a preceding Linear layer")
        if not rest:
            if k + 1 == len(parsed.layers):
                raise ValueError(
                    f"Linear layer {index} (the last) has no bounded activation after it: the "
                    f"output is unbounded, so F Assumption 4.1 (i) and the bounds d_q1, d_q2 fail")
            nxt = parsed.layers[k + 1]
            raise ValueError(
                f"{where(nxt.positions[0], nxt.owner)}: Linear layer {index} is not followed by a bounded "
                f"activation (F Assumption 4.1 i needs |sigma| <= 1 after every layer)")
        pos, mod = rest[0]
        act = _activation_constants(mod, lin.out_features)
        if act is None:
            raise ValueError(
                f"{where(pos, mod)} is not a supported bounded activation: F Assumption 4.1 (i) needs "
                f"|sigma| <= 1 with bounded sigma', sigma'' (built in: "
                f"{', '.join(t.__name__ for t in ACTIVATIONS)}; declare others as one "
                f"smoothchain.components.Elementwise class, docs/registry.md)")
        if not (0.0 <= act.bound <= 1.0) or not (math.isfinite(act.d1) and math.isfinite(act.d2)):
            raise ValueError(f"{where(pos, mod)}: activation {act.name} has sup|sigma| = {act.bound}, "
                             f"sup|sigma'| = {act.d1}, sup|sigma''| = {act.d2}; F Assumption 4.1 (i) needs "
                             f"|sigma| <= 1 and bounded derivatives")
        layers.append(LayerSpec(index, lin, act, lin.in_features, lin.out_features, lin.bias is not None))
    for a, b in zip(layers, layers[1:]):
        if b.in_features != a.out_features:
            raise ValueError(f"layer {b.index} expects {b.in_features} inputs but layer {a.index} "
                             f"has {a.out_features} outputs")
    return layers


def layer_matrix(spec: LayerSpec, grad: bool = False) -> torch.Tensor:
    """[W | b] (or [dW | db] with ``grad=True``; a missing gradient counts as zero), detached."""
    lin = spec.linear
    W = lin.weight.grad if grad else lin.weight
    if W is None:
        W = torch.zeros_like(lin.weight)
    if not spec.bias:
        return W.detach()
    b = lin.bias.grad if grad else lin.bias
    if b is None:
        b = torch.zeros_like(lin.bias)
    return torch.cat([W.detach(), b.detach().reshape(-1, 1)], dim=1)


def check_data_bound(data_bound) -> float:
    try:
        D = float(data_bound)
    except (TypeError, ValueError):
        raise ValueError(f"data_bound must be a positive number, got {data_bound!r}") from None
    if not (D > 0 and math.isfinite(D)):
        raise ValueError(f"data_bound must be positive and finite, got {data_bound!r}")
    return D


def input_norm_bound(width: int, bias: bool, q: float, entry_bound: float = 1.0) -> float:
    """sup ||[y; 1]||_q over y in [-B, B]^width (without the 1 if no bias): the c of layer i."""
    q = check_q(q)
    B = float(entry_bound)
    if q == math.inf:
        return max(B, 1.0) if bias else B
    return (width * B**q + (1.0 if bias else 0.0)) ** (1.0 / q)


@dataclass(frozen=True)
class ChainConstants:
    """The weight-independent constants of F Prop. 4.3 for one network, q and D.

    ``c2[i]`` = c_i^2 (layer i's augmented-input bound squared), ``alpha[i]``, ``beta[i]`` the
    activation constants, ``d1``, ``d2`` = d_{q,1}, d_{q,2} on the output width (F Table 1 with
    the bookkeeping of the module docstring).  :meth:`p` evaluates F eq. (23) from the layer
    norms in O(K) floating-point operations, so optimizers can call it every step.
    """

    c2: tuple
    alpha: tuple
    beta: tuple
    d1: float
    d2: float

    @classmethod
    def build(cls, layers: Sequence[LayerSpec], q, data_bound: float = 1.0) -> "ChainConstants":
        q = check_q(q)
        D = check_data_bound(data_bound)
        d1, d2 = f_loss_constants(layers[-1].out_features, q, D)  # F Table 1, squared error
        c2 = tuple(input_norm_bound(s.in_features, s.bias, q, D if k == 0 else 1.0) ** 2
                   for k, s in enumerate(layers))
        return cls(c2, tuple(s.activation.d1 for s in layers), tuple(s.activation.d2 for s in layers),
                   d1, d2)

    def p(self, norms: Sequence[float]) -> list[float]:
        """p_1..p_K (F eq. 23) from z_i = ||[W_i | b_i]||_q (z_1 is never used): the backward
        recursions r^(i-1) = alpha_i z_i r^(i), v^(i-1) = alpha_i^2 z_i^2 v^(i) + beta_i z_i^2 r^(i)
        of the module docstring (F eqs. 59-60), s_i of F Prop. 4.3, p_i = sqrt(s_i + 1)."""
        K = len(self.c2)
        if len(norms) != K:
            raise ValueError(f"need {K} layer norms, got {len(norms)}")
        d1, d2, c2, alpha, beta = self.d1, self.d2, self.c2, self.alpha, self.beta
        sqrt = math.sqrt
        p = [0.0] * K
        r, v = 1.0, 0.0  # r^(K), v^(K): the identity map after the last layer
        for i in range(K - 1, -1, -1):  # 0-based i is F's layer i+1
            a, bb = alpha[i], beta[i]
            a2 = a * a
            p[i] = sqrt(c2[i] * (d2 * a2 * r * r + d1 * a2 * v + d1 * bb * r) + 1.0)
            z = float(norms[i])
            z2 = z * z
            v, r = a2 * z2 * v + bb * z2 * r, a * z * r
        return p


def layer_bounds_from_norms(layers: Sequence[LayerSpec], norms: Sequence[float], q,
                            data_bound: float = 1.0) -> list[float]:
    """p_1..p_K of F Prop. 4.3 (eq. 23) from the layers' operator norms
    z_i = ||[W_i | b_i]||_q (z_1 is never used); see :class:`ChainConstants`."""
    if len(norms) != len(layers):
        raise ValueError(f"need {len(layers)} layer norms, got {len(norms)}")
    return ChainConstants.build(layers, q, data_bound).p(norms)


def _check_finite(layers: Sequence[LayerSpec]) -> None:
    for spec in layers:
        for name in ("weight", "bias"):
            t = getattr(spec.linear, name)
            if t is None:
                continue
            if not torch.isfinite(t).all():
                bad = t.detach()[~torch.isfinite(t.detach())].flatten()[0].item()
                raise ValueError(f"layer {spec.index} {name} contains a non-finite value ({bad})")


def layer_bounds(model: nn.Module, q, data_bound: float = 1.0) -> list[float]:
    """p_i(w), i = 1..K, of F Prop. 4.3 for ``model`` at its current weights.

    ``||d^2 f / d w_i^2 (w)||_q <= p_i(w)^2`` for the objective mean ||y^K - z||_2^2 on any data
    with ||x||_inf, ||z||_inf <= ``data_bound``, the layer matrices being [W_i | b_i] with the
    operator q-norm.  Spectral norms are exact (float64 eigenvalues), so p_i is an upper bound.
    """
    q = check_q(q)
    D = check_data_bound(data_bound)
    layers = parse_model(model)
    _check_finite(layers)
    norms = [0.0] + [matrix_norm(layer_matrix(s), q) for s in layers[1:]]
    return layer_bounds_from_norms(layers, norms, q, D)


def check_data(x: torch.Tensor, z: torch.Tensor | None = None, data_bound: float = 1.0, *,
               rescale: bool = False):
    """Check F Assumption 4.1 (ii): ||x||_inf <= D and ||z||_inf <= D.

    Raises ``ValueError`` naming the tensor ("inputs" / "targets") and its largest |entry| when
    the bound fails (or an entry is not finite).  With ``rescale=True`` an offending tensor is
    divided by max|entry| / D instead and returned; the result is ``(x, z)``.  Rescaling
    targets changes the problem (the loss scales by the square of the factor): ask for it only
    if that is what you want.
    """
    D = check_data_bound(data_bound)
    out = []
    for name, t in (("inputs", x), ("targets", z)):
        if t is None:
            out.append(None)
            continue
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contain a non-finite value; F Assumption 4.1 (ii) fails")
        m = t.detach().abs().max().item() if t.numel() else 0.0
        if m > D:
            if not rescale:
                raise ValueError(
                    f"{name} violate F Assumption 4.1 (ii): max |entry| = {m:.6g} > data_bound "
                    f"= {D:.6g} (pass a larger data_bound, or rescale=True to divide by {m / D:.6g})")
            t = t * (D / m)
        out.append(t)
    return out[0], out[1]


def objective(model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """F eqs. (21)-(22): the batch mean of ||model(x) - z||_2^2 (no 1/2), summed over outputs
    (the loss table's ``"squared-error"``)."""
    return squared_error(model(x), z)
