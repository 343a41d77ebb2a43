"""Forward recursions for the constants of a chain (RH Prop. 4.3, Lemma D.2, Prop. 4.4, Cor. 4.5).

Conventions (DESIGN.md): ``0 * inf = 0`` -- a zero factor removes its term -- and ``inf``
otherwise propagates through sums, products and minima.  All recursions are pure Python
floats, so they cost microseconds even for VGG-16 and need no PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .chain import Chain, ComponentConstants, Layer, _mul
from .graph import Graph

__all__ = [
    "CompositeBounds",
    "LayerBound",
    "ChainBounds",
    "NodeBound",
    "GraphBounds",
    "composite_bounds",
    "layer_step",
    "graph_bounds",
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


def layer_step(layer: Layer, radius: float, m_prev: float, l_prev: float, L_prev: float, *, index: int = 1,
               name: str = "") -> LayerBound:
    """One step of RH Prop. 4.4: m_l, l_l, L_l of z_l = a_l(b_l(v_l, z_{l-1})) from those of z_{l-1}.

    * m_{l,0} = L_beta R m_{l-1} + l_beta^v R + l_beta^z m_{l-1} + ||beta^0||, m_l = m_{l,k_l};
    * l_l = (prod_j l_{l,j}) ((L_beta R + l_beta^z) l_{l-1} + m_{l-1} L_beta + l_beta^v)   (eq. 20);
    * L_l = L_{l-1} (L_beta R + l_beta^z) prod_j l_{l,j}
      + (L_beta R + l_beta^z)^2 L_{l,k} l_{l-1}^2
      + 2 ((L_beta m_{l-1} + l_beta^v)(L_beta R + l_beta^z) L_{l,k} + L_beta prod_j l_{l,j}) l_{l-1}
      + (L_beta m_{l-1} + l_beta^v)^2 L_{l,k}                                                (eq. 21),

    with a_l's constants from Lemma D.2 on the ball of radius m_{l,0}.
    """
    b, R = layer.bilinear, radius
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
    return LayerBound(index=index, name=name or layer.name or f"layer{index}", output_bound=a.bound, lipschitz=lip,
                      smoothness=smooth, pre_activation_bound=m0, nonlinear_lipschitz=lip_a,
                      nonlinear_smoothness=smooth_a)


def chain_bounds(chain: Chain) -> ChainBounds:
    """RH Prop. 4.4 on C = {||v_l|| <= R} (or RH Cor. 4.5 when ``chain.centre == "weights"``).

    For l = 1..tau, with m_0 = ||x||, l_0 = L_0 = 0: :func:`layer_step`.  A chain centred at the
    weights has already had Cor. 4.5's substitutions applied by :meth:`Chain.around_weights`;
    the recursion is the same.
    """
    m_prev, l_prev, L_prev = chain.input_norm, 0.0, 0.0
    rows = []
    for index, layer in enumerate(chain.layers, start=1):
        row = layer_step(layer, chain.radius, m_prev, l_prev, L_prev, index=index)
        rows.append(row)
        m_prev, l_prev, L_prev = row.output_bound, row.lipschitz, row.smoothness
    return ChainBounds(
        layers=tuple(rows),
        output_bound=m_prev,
        lipschitz=l_prev,
        smoothness=L_prev,
        radius=chain.radius,
        input_norm=chain.input_norm,
        centre=chain.centre,
    )


@dataclass(frozen=True)
class NodeBound:
    """m_n, l_n, L_n of node n of a graph on C; ``layer`` is the layer step's row for a layer node."""

    index: int
    name: str
    kind: str
    output_bound: float
    lipschitz: float
    smoothness: float
    layer: LayerBound | None = None


@dataclass(frozen=True)
class GraphBounds(ChainBounds):
    """m, l, L of a graph's output on C, with every node's (``nodes``) and the layer nodes' rows
    (``layers``, numbered 1.. in order, as in a chain's table)."""

    nodes: tuple[NodeBound, ...] = ()


def graph_bounds(graph: Graph) -> GraphBounds:
    """The recursion over a graph's topological order (docs/graphs.md).

    The input node has m = ||x||, l = L = 0; a layer node takes :func:`layer_step` (RH Prop. 4.4)
    from its input node's constants; a merge node its own rule
    (:meth:`smoothchain.graph.Merge.constants`).  On a chain it is :func:`chain_bounds`.
    """
    consts: list[tuple[float, float, float]] = [(graph.input_norm, 0.0, 0.0)]
    nodes = [NodeBound(0, graph.nodes[0].name or "input", "input", graph.input_norm, 0.0, 0.0)]
    rows: list[LayerBound] = []
    for i, node in enumerate(graph.nodes[1:], start=1):
        if node.layer is not None:
            row = layer_step(node.layer, graph.radius, *consts[node.inputs[0]], index=len(rows) + 1,
                             name=node.name)
            rows.append(row)
            mlL = (row.output_bound, row.lipschitz, row.smoothness)
        else:
            row = None
            mlL = node.merge.constants([consts[j] for j in node.inputs])
        consts.append(mlL)
        nodes.append(NodeBound(i, node.name or f"node{i}", node.kind, *mlL, layer=row))
    m, l, L = consts[-1]
    return GraphBounds(layers=tuple(rows), output_bound=m, lipschitz=l, smoothness=L, radius=graph.radius,
                       input_norm=graph.input_norm, centre=graph.centre, nodes=tuple(nodes))


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
