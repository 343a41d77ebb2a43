"""Computation graphs of layers: RH's chain (Def. 2.1) with merges (issue 13, docs/graphs.md).

A graph is a list of nodes in topological order.  Node 0 is the input batch x; every other
node computes z_n from earlier nodes, either by

* a :class:`~smoothchain.chain.Layer` (bi-affine part and composite non-linearity, RH eq. 7)
  applied to one input node, with weights v_n of its own, or
* a :class:`Merge` of several input nodes, without weights: a weighted :class:`Sum`
  (``x + f(x)`` of a residual block, a scaling), a :class:`Concat` (``torch.cat``) or an
  element-wise :class:`Product`.

The output is the last node.  As for a chain, every quantity is in the Euclidean norm of the
whole vectorised batch, and C = {w : ||v_n - v*_n|| <= R for every layer node}.  Each merge
declares its own rule -- the bound, Lipschitz and smoothness constants of its output from those
of its inputs, proved in docs/graphs.md -- and :func:`smoothchain.recursion.graph_bounds` runs
RH Prop. 4.4's layer step and these rules over the topological order.  A chain is the graph in
which every node is a layer fed by the node before it, and the recursion is then Prop. 4.4's.
All classes are plain frozen dataclasses: no PyTorch needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from .chain import BilinearConstants, Chain, ChainError, ComponentConstants, Layer, _check_constant, _mul

__all__ = ["Merge", "Sum", "Concat", "Product", "Node", "Graph", "identity_layer"]


@dataclass(frozen=True)
class Merge:
    """A node without weights combining its inputs' values; subclasses give the rule.

    :meth:`constants` maps the inputs' (m, l, L) -- output bound, Lipschitz and smoothness
    constants on C of each input as a function of the weights -- to the merge's own.
    """

    name = "merge"
    arity = None  # (class attribute) the number of inputs it takes; None: any >= 1

    def constants(self, inputs: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
        raise NotImplementedError

    def check_inputs(self, count: int, where: str) -> None:
        expected = self.arity
        if count < 1 or (expected is not None and count != expected):
            raise ChainError(f"{where}: a {self.name} takes {expected or 'one or more'} inputs, got {count}")


@dataclass(frozen=True)
class Sum(Merge):
    """z = sum_i c_i z_i (a residual ``x + f(x)`` has c = (1, 1); a scaling has one input).

    m = sum |c_i| m_i, l = sum |c_i| l_i, L = sum |c_i| L_i (triangle inequality, docs/graphs.md).
    """

    coefficients: tuple[float, ...] = (1.0, 1.0)
    name = "sum"

    def __post_init__(self) -> None:
        coefficients = tuple(float(c) for c in self.coefficients)
        if not coefficients or any(math.isnan(c) or math.isinf(c) for c in coefficients):
            raise ChainError(f"a sum needs finite coefficients, got {self.coefficients!r}")
        object.__setattr__(self, "coefficients", coefficients)

    @property
    def arity(self) -> int:  # one coefficient per input
        return len(self.coefficients)

    def constants(self, inputs):
        return tuple(sum(_mul(abs(c), x[k]) for c, x in zip(self.coefficients, inputs)) for k in range(3))


@dataclass(frozen=True)
class Concat(Merge):
    """z = (z_1, ..., z_k) along any dimension (``torch.cat``): the entries are those of the inputs.

    m = sqrt(sum m_i^2), l = sqrt(sum l_i^2), L = sqrt(sum L_i^2) (docs/graphs.md).
    """

    name = "concat"

    def constants(self, inputs):
        return tuple(math.hypot(*(x[k] for x in inputs)) for k in range(3))


@dataclass(frozen=True)
class Product(Merge):
    """z = z_1 * z_2 entry by entry (gates, attention-like products).

    m = m_1 m_2, l = l_1 m_2 + m_1 l_2, L = L_1 m_2 + 2 l_1 l_2 + m_1 L_2, from
    ||a * b|| <= ||a||_inf ||b|| <= ||a|| ||b|| and the product rule (docs/graphs.md).
    """

    arity = 2
    name = "product"

    def constants(self, inputs):
        (m1, l1, L1), (m2, l2, L2) = inputs
        return (_mul(m1, m2), _mul(l1, m2) + _mul(m1, l2),
                _mul(L1, m2) + _mul(2.0, _mul(l1, l2)) + _mul(m1, L2))


def identity_layer(nonlinear: Sequence[ComponentConstants], name: str = "") -> Layer:
    """A layer without weights: the non-linear parts applied to the input (e.g. the ReLU after a
    residual sum).  Its bi-affine part is the identity z -> z (l_beta^z = 1, nothing else)."""
    return Layer(BilinearConstants(input_lipschitz=1.0), tuple(nonlinear), name=name)


@dataclass(frozen=True)
class Node:
    """One node: a layer applied to ``inputs[0]``, or a merge of ``inputs`` (indices of earlier
    nodes); the input node (index 0) has neither and no inputs."""

    name: str
    inputs: tuple[int, ...] = ()
    layer: Layer | None = None
    merge: Merge | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(int(i) for i in self.inputs))

    @property
    def kind(self) -> str:
        return "input" if not self.inputs else ("layer" if self.layer is not None else self.merge.name)


@dataclass(frozen=True)
class Graph:
    """A computation graph of layers and merges with input norm ||x|| (issue 13).

    ``nodes`` are in topological order, ``nodes[0]`` the input; the output is the last node.
    ``radius`` is R of C = {||v_n - v*_n|| <= R for every layer node}; v* = 0 unless the graph
    was produced by :meth:`around_weights`.
    """

    nodes: tuple[Node, ...]
    input_norm: float = 1.0
    radius: float = 1.0
    centre: str = field(default="zero")  # "zero" (RH Prop. 4.4) or "weights" (RH Cor. 4.5)

    def __post_init__(self) -> None:
        nodes = tuple(self.nodes)
        object.__setattr__(self, "nodes", nodes)
        if len(nodes) < 2:
            raise ChainError("a graph needs an input node and at least one node after it")
        if nodes[0].inputs or nodes[0].layer is not None or nodes[0].merge is not None:
            raise ChainError("node 0 is the input: it has no inputs, layer or merge")
        for i, n in enumerate(nodes[1:], start=1):
            where = f"node {i} ({n.name or 'unnamed'})"
            if (n.layer is None) == (n.merge is None):
                raise ChainError(f"{where}: give exactly one of a layer or a merge")
            if any(not 0 <= j < i for j in n.inputs):
                raise ChainError(f"{where}: inputs {list(n.inputs)} must be earlier nodes (topological order)")
            if n.layer is not None and len(n.inputs) != 1:
                raise ChainError(f"{where}: a layer takes one input, got {len(n.inputs)}")
            if n.merge is not None:
                n.merge.check_inputs(len(n.inputs), where)
        object.__setattr__(self, "input_norm", _check_constant(self.input_norm, "input_norm"))
        radius = _check_constant(self.radius, "radius")
        if math.isinf(radius):
            raise ChainError("radius must be finite")
        object.__setattr__(self, "radius", radius)

    @classmethod
    def from_chain(cls, chain: Chain) -> "Graph":
        """The chain as a graph: layer l fed by node l - 1."""
        nodes = [Node("input")] + [Node(layer.name or f"layer{i}", (i - 1,), layer=layer)
                                   for i, layer in enumerate(chain.layers, start=1)]
        return cls(tuple(nodes), input_norm=chain.input_norm, radius=chain.radius, centre=chain.centre)

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The layer nodes' layers, in order."""
        return tuple(n.layer for n in self.nodes if n.layer is not None)

    def with_options(self, *, radius: float | None = None, input_norm: float | None = None) -> "Graph":
        return replace(self, radius=self.radius if radius is None else radius,
                       input_norm=self.input_norm if input_norm is None else input_norm)

    def around_weights(self) -> "Graph":
        """The graph on balls around the weights seen as one around 0: RH Cor. 4.5's substitution
        in every layer node (:meth:`Chain.around_weights`); merges have no weights."""
        if self.centre == "weights":
            raise ChainError("graph is already centred at the weights")
        layer_nodes = [i for i, n in enumerate(self.nodes) if n.layer is not None]
        weighted = [i for i in layer_nodes if _has_weights(self.nodes[i].layer)]
        shifted = {}
        if weighted:
            chain = Chain(tuple(self.nodes[i].layer for i in weighted), self.input_norm, self.radius)
            shifted = dict(zip(weighted, chain.around_weights().layers))
        nodes = tuple(replace(n, layer=shifted[i]) if i in shifted else n for i, n in enumerate(self.nodes))
        return replace(self, nodes=nodes, centre="weights")


def _has_weights(layer: Layer) -> bool:
    b = layer.bilinear
    return b.smoothness > 0 or b.weight_lipschitz > 0
