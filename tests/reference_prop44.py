"""Independent reference for RH Prop. 4.4 (i)-(iii), Lemma D.2, Cor. 4.5 and Prop. 4.2.

Written from the paper text (Roulet & Harchaoui, long version, Sec. 4.2 and Appendix D.2),
working directly on a decoded ``--spec`` JSON document (DESIGN.md format, each layer possibly
carrying an extra ``"weight_norm"`` = ||v*_l||_2).  It deliberately does not import anything
from ``smoothchain``: it is the test oracle for ``smoothchain.recursion`` and the CLI.

Conventions (DESIGN.md): a product with a zero factor is zero even if another factor is
infinite (``0 * inf = 0``); otherwise ``inf`` propagates through sums, products and minima.

Notation (paper): layer l has the bi-affine constants
    Lb = L_beta_l, lv = l_beta^v_l, lz = l_beta^z_l, b0 = ||beta^0_l||
and components a_{l,1}, ..., a_{l,k_l} with (m_a, l_a, L_a, ||a(0)||, ||grad a(0)||).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

INF = math.inf

BILINEAR_KEYS = ("smoothness", "weight_lipschitz", "input_lipschitz", "offset_norm")
NONLINEAR_KEYS = ("bound", "lipschitz", "smoothness", "value_at_zero", "jacobian_at_zero")


def num(x: Any) -> float:
    """A spec constant as a float: numbers as they are, "inf"/"infinity" (any case) as inf."""
    if isinstance(x, str):
        if x.strip().lower() in ("inf", "+inf", "infinity", "+infinity"):
            return INF
        raise ValueError(f"not a constant: {x!r}")
    return float(x)


def times(*factors: float) -> float:
    """Product of non-negative factors in which any zero factor wins over inf."""
    for f in factors:
        if f == 0:
            return 0.0
    return math.prod(factors)


def total(terms: Iterable[float]) -> float:
    out = 0.0
    for t in terms:
        out = out + t
    return out


# --------------------------------------------------------------------------- Lemma D.2
def lemma_d2(components: Sequence[Mapping[str, Any]], radius: float) -> tuple[float, list[float], float]:
    """RH Lemma D.2 for a = a_k o ... o a_1 on the ball B_R.

    Returns (m~_k(R), [l~_1(R), ..., l~_k(R)], smoothness bound
    sum_j L_{a_j} (prod_{i<j} l~_i)^2 prod_{i>j} l~_i).  With k = 0: (R, [], 0).
    """
    m_tilde = [num(radius)]  # m~_0(R) = R
    l_tilde: list[float] = []
    for comp in components:
        m_a = num(comp["bound"])
        l_a = num(comp["lipschitz"])
        L_a = num(comp["smoothness"])
        a0 = num(comp["value_at_zero"])
        g0 = num(comp["jacobian_at_zero"])
        r = m_tilde[-1]
        candidates = [m_a, a0 + times(l_a, r), a0 + times(g0 + times(L_a, r), r)]
        m_tilde.append(min(candidates))
        l_tilde.append(min(l_a, g0 + times(L_a, r)))
    k = len(l_tilde)
    smooth_terms = []
    for j in range(k):
        L_aj = num(components[j]["smoothness"])
        before = l_tilde[:j]
        after = l_tilde[j + 1 :]
        smooth_terms.append(times(L_aj, *before, *before, *after))
    return m_tilde[-1], l_tilde, total(smooth_terms)


# --------------------------------------------------------------------------- Prop. 4.4
def _bilinear(layer: Mapping[str, Any], around_weights: bool) -> tuple[float, float, float, float]:
    bil = layer["bilinear"]
    Lb, lv, lz, b0 = (num(bil[k]) for k in BILINEAR_KEYS)
    if around_weights:
        # RH Cor. 4.5: l_beta^z + L_beta ||v*||  and  ||beta^0|| + l_beta^v ||v*||.
        if "weight_norm" not in layer or layer["weight_norm"] is None:
            raise KeyError("around_weights needs every layer's weight_norm")
        w = num(layer["weight_norm"])
        lz = lz + times(Lb, w)
        b0 = b0 + times(lv, w)
    return Lb, lv, lz, b0


def prop44_layers(
    spec: Mapping[str, Any],
    *,
    around_weights: bool = False,
    radius: float | None = None,
    input_norm: float | None = None,
) -> list[tuple[float, float, float]]:
    """Per-layer (m_l, l_l, L_l) of RH Prop. 4.4 (Cor. 4.5 when ``around_weights``).

    ``radius``/``input_norm`` override the document's (as the CLI options do).
    """
    R = num(spec.get("radius", 1.0)) if radius is None else float(radius)
    m_prev = num(spec.get("input_norm", 1.0)) if input_norm is None else float(input_norm)
    l_prev = 0.0  # l_0 = 0
    L_prev = 0.0  # L_0 = 0
    rows = []
    for layer in spec["layers"]:
        Lb, lv, lz, b0 = _bilinear(layer, around_weights)
        comps = layer.get("nonlinear", []) or []

        # (i): m_{l,0} = L_beta R m_{l-1} + l_beta^v R + l_beta^z m_{l-1} + ||beta^0||
        m_l0 = total([times(Lb, R, m_prev), times(lv, R), times(lz, m_prev), b0])
        m_l, l_lj, L_lk = lemma_d2(comps, m_l0)
        prod_l = times(*l_lj) if l_lj else 1.0  # prod_j l_{l,j} (empty product = 1)

        A = times(Lb, R) + lz  # L_beta R + l_beta^z
        B = times(Lb, m_prev) + lv  # L_beta m_{l-1} + l_beta^v  (= m_{l-1} L_beta + l_beta^v)

        # (ii), eq. (20)
        l_l = times(prod_l, times(A, l_prev) + B)

        # (iii), eq. (21)
        L_l = total(
            [
                times(L_prev, A, prod_l),
                times(A, A, L_lk, l_prev, l_prev),
                times(2.0, times(B, A, L_lk) + times(Lb, prod_l), l_prev),
                times(B, B, L_lk),
            ]
        )
        rows.append((m_l, l_l, L_l))
        m_prev, l_prev, L_prev = m_l, l_l, L_l
    return rows


# --------------------------------------------------------------------------- Prop. 4.3
def prop43(layer_lipschitz: Sequence[float], layer_smoothness: Sequence[float]) -> tuple[float, float]:
    """RH Prop. 4.3: l_l = l_phi + l_{l-1} l_phi and L_l = L_{l-1} l_phi + L_phi (1 + l_{l-1})^2."""
    l, L = 0.0, 0.0
    for l_phi, L_phi in zip(layer_lipschitz, layer_smoothness):
        l, L = l_phi + times(l, l_phi), times(L, l_phi) + times(L_phi, 1.0 + l, 1.0 + l)
    return l, L


# --------------------------------------------------------------------------- Prop. 4.2
def prop42(chain_lipschitz: float, chain_smoothness: float, loss_lipschitz: float, loss_smoothness: float,
           reg_smoothness: float = 0.0) -> float:
    """RH Prop. 4.2 with l~_f = l_f: L_F = L_psi l_f + l_psi^2 L_f + L_r."""
    return times(chain_smoothness, loss_lipschitz) + times(chain_lipschitz, chain_lipschitz, loss_smoothness) + reg_smoothness
