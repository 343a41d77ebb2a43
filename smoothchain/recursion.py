"""Forward recursions for the constants of a chain (RH Prop. 4.3, Lemma D.2, Prop. 4.4, Cor. 4.5).

Conventions (DESIGN.md): ``0 * inf = 0`` -- a zero factor removes its term -- and ``inf``
otherwise propagates through sums, products and minima.  All recursions are pure Python
floats, so they cost microseconds even for VGG-16 and need no PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .chain import Chain, ComponentConstants, _mul

__all__ = [
    "CompositeBounds",
    "LayerBound",
    "ChainBounds",
    "composite_bounds",
    "generic_chain_bounds",
    "chain_bounds",
]


def _prod(*factors: float) -> float:
    out = 1.0
    for f in factors:
        out = _mul(out, f)
    return out


@dataclass(frozen=True)
class CompositeBounds:
    """Bounds of a = a_k o ... o a_1 on a ball B_R (RH Lemma D.2).

    ``bounds[j]`` is m~_j(R) (``bounds[0] = R``), ``lipschitz[j-1]`` is l~_j(R).
    """

    bounds: tuple[float, ...]
    lipschitz: tuple[float, ...]
    bound: float
    lipschitz_product: float
    smoothness: float


def composite_bounds(components: Sequence[ComponentConstants], radius: float) -> CompositeBounds:
    """RH Lemma D.2: output bound, Lipschitz and smoothness of a_k o ... o a_1 on B_R.

    m~_j = min{m_j, ||a_j(0)|| + l_j m~_{j-1}, ||a_j(0)|| + (||grad a_j(0)|| + L_j m~_{j-1}) m~_{j-1}},
    l~_j = min{l_j, ||grad a_j(0)|| + L_j m~_{j-1}},
    L    = sum_j L_j (prod_{i<j} l~_i)^2 prod_{i>j} l~_i,   with m~_0 = R.
    """
    bounds = [float(radius)]
    lips: list[float] = []
    for a in components:
        m_prev = bounds[-1]
        bounds.append(
            min(
                a.bound,
                a.value_at_zero + _mul(a.lipschitz, m_prev),
                a.value_at_zero + _mul(a.jacobian_at_zero + _mul(a.smoothness, m_prev), m_prev),
            )
        )
        lips.append(min(a.lipschitz, a.jacobian_at_zero + _mul(a.smoothness, m_prev)))
    smooth = 0.0
    for j, a in enumerate(components):
        before = _prod(*lips[:j])
        after = _prod(*lips[j + 1 :])
        smooth += _prod(a.smoothness, before, before, after)
    return CompositeBounds(
        bounds=tuple(bounds),
        lipschitz=tuple(lips),
        bound=bounds[-1],
        lipschitz_product=_prod(*lips),
        smoothness=smooth,
    )


@dataclass(frozen=True)
class LayerBound:
    """Row l of the per-layer table: m_l, l_l, L_l of RH Prop. 4.4 after layer l.

    ``pre_activation_bound`` is m_{l,0} (the bound on ||b_l(v_l, z_{l-1})||), and
    ``nonlinear_lipschitz``/``nonlinear_smoothness`` are prod_j l_{l,j} and L_{l,k_l}.
    """

    index: int
    name: str
    output_bound: float
    lipschitz: float
    smoothness: float
    pre_activation_bound: float
    nonlinear_lipschitz: float
    nonlinear_smoothness: float


@dataclass(frozen=True)
class ChainBounds:
    """m, l, L of a chain on C, with the per-layer table (RH Prop. 4.4 / Cor. 4.5)."""

    layers: tuple[LayerBound, ...]
    output_bound: float
    lipschitz: float
    smoothness: float
    radius: float
    input_norm: float
    centre: str


def chain_bounds(chain: Chain) -> ChainBounds:
    """RH Prop. 4.4 on C = {||v_l|| <= R} (or RH Cor. 4.5 when ``chain.centre == "weights"``).

    For l = 1..tau, with m_0 = ||x||, l_0 = L_0 = 0, and a_l's constants from Lemma D.2 on the
    ball of radius m_{l,0}:

    * m_{l,0} = L_beta R m_{l-1} + l_beta^v R + l_beta^z m_{l-1} + ||beta^0||, m_l = m_{l,k_l};
    * l_l = (prod_j l_{l,j}) ((L_beta R + l_beta^z) l_{l-1} + m_{l-1} L_beta + l_beta^v)   (eq. 20);
    * L_l = L_{l-1} (L_beta R + l_beta^z) prod_j l_{l,j}
      + (L_beta R + l_beta^z)^2 L_{l,k} l_{l-1}^2
      + 2 ((L_beta m_{l-1} + l_beta^v)(L_beta R + l_beta^z) L_{l,k} + L_beta prod_j l_{l,j}) l_{l-1}
      + (L_beta m_{l-1} + l_beta^v)^2 L_{l,k}                                                (eq. 21).

    A chain centred at the weights has already had Cor. 4.5's substitutions applied by
    :meth:`Chain.around_weights`; the recursion is the same.
    """
    R = chain.radius
    m_prev, l_prev, L_prev = chain.input_norm, 0.0, 0.0
    rows = []
    for index, layer in enumerate(chain.layers, start=1):
        b = layer.bilinear
        m0 = _mul(_mul(b.smoothness, R), m_prev) + _mul(b.weight_lipschitz, R) + _mul(b.input_lipschitz, m_prev) + b.offset_norm
        a = composite_bounds(layer.nonlinear, m0)
        lip_a, smooth_a = a.lipschitz_product, a.smoothness
        z_gain = _mul(b.smoothness, R) + b.input_lipschitz  # L_beta R + l_beta^z
        v_gain = _mul(b.smoothness, m_prev) + b.weight_lipschitz  # L_beta m_{l-1} + l_beta^v
        lip = _mul(lip_a, _mul(z_gain, l_prev) + v_gain)
        smooth = (
            _prod(L_prev, z_gain, lip_a)
            + _prod(z_gain, z_gain, smooth_a, l_prev, l_prev)
            + _prod(2.0, _prod(v_gain, z_gain, smooth_a) + _prod(b.smoothness, lip_a), l_prev)
            + _prod(v_gain, v_gain, smooth_a)
        )
        rows.append(
            LayerBound(
                index=index,
                name=layer.name or f"layer{index}",
                output_bound=a.bound,
                lipschitz=lip,
                smoothness=smooth,
                pre_activation_bound=m0,
                nonlinear_lipschitz=lip_a,
                nonlinear_smoothness=smooth_a,
            )
        )
        m_prev, l_prev, L_prev = a.bound, lip, smooth
    return ChainBounds(
        layers=tuple(rows),
        output_bound=m_prev,
        lipschitz=l_prev,
        smoothness=L_prev,
        radius=R,
        input_norm=chain.input_norm,
        centre=chain.centre,
    )


def generic_chain_bounds(layer_lipschitz: Sequence[float], layer_smoothness: Sequence[float]) -> tuple[float, float]:
    """RH Prop. 4.3: l_l = l_phi + l_{l-1} l_phi, L_l = L_{l-1} l_phi + L_phi (1 + l_{l-1})^2.

    For layers phi_l that are globally l_phi-Lipschitz and L_phi-smooth (jointly in (v, z)).
    Returns (l_tau, L_tau).
    """
    if len(layer_lipschitz) != len(layer_smoothness):
        raise ValueError(
            f"got {len(layer_lipschitz)} Lipschitz constants but {len(layer_smoothness)} smoothness constants"
        )
    lip, smooth = 0.0, 0.0
    for l_phi, L_phi in zip(layer_lipschitz, layer_smoothness):
        one_plus = 1.0 + lip
        smooth = _mul(smooth, l_phi) + _prod(L_phi, one_plus, one_plus)
        lip = l_phi + _mul(lip, l_phi)
    return lip, smooth
