"""The chain of computations of RH Def. 2.1, described by its components' constants.

A chain psi(w) = z_tau with z_l = phi_l(v_l, z_{l-1}), z_0 = x (RH Def. 2.1, eq. 3), whose
layers are phi_l(v, z) = a_l(b_l(v, z)) (RH eq. 7) with

* a bi-affine part b_l(v, z) = beta_l(v, z) + beta^v_l(v) + beta^z_l(z) + beta^0_l (RH eq. 6),
  described by :class:`BilinearConstants` (L_beta, l_beta^v, l_beta^z, ||beta^0||_2), and
* an ordered composite non-linearity a_l = a_{l,k} o ... o a_{l,1} (activation, pooling,
  normalisation), each a_{l,j} described by :class:`ComponentConstants`
  (m, l, L, ||a(0)||_2, ||grad a(0)||_2) as in RH Prop. 4.4 and Lemma D.2.

Every quantity is with respect to the Euclidean norm of the whole vectorised batch
(RH Sec. 2.3, footnote 4).  ``math.inf`` stands for "unbounded / not defined".
All classes here are plain frozen dataclasses: no PyTorch needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

__all__ = ["BilinearConstants", "ComponentConstants", "Layer", "Chain", "ChainError"]


class ChainError(ValueError):
    """Invalid chain description (negative or NaN constant, bad radius, ...)."""


def _check_constant(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ChainError(f"{what} must be a number or 'inf', got {value!r}") from None
    if math.isnan(value):
        raise ChainError(f"{what} is NaN; constants must be >= 0 or inf")
    if value < 0:
        raise ChainError(f"{what} = {value} is negative; constants must be >= 0 or inf")
    return value


@dataclass(frozen=True)
class BilinearConstants:
    """Constants of the bi-affine part b_l (RH eq. 6, Prop. 4.4).

    Attributes:
        smoothness: L_beta = ||B||_{2,2,2}, smoothness of the bilinear beta (RH Prop. A.5).
        weight_lipschitz: l_beta^v, Lipschitz constant of the linear map v -> beta^v(v).
        input_lipschitz: l_beta^z, Lipschitz constant of the linear map z -> beta^z(z).
        offset_norm: ||beta^0||_2, norm of the constant term.
    """

    smoothness: float = 0.0
    weight_lipschitz: float = 0.0
    input_lipschitz: float = 0.0
    offset_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("smoothness", "weight_lipschitz", "input_lipschitz", "offset_norm"):
            object.__setattr__(self, name, _check_constant(getattr(self, name), f"bilinear.{name}"))


@dataclass(frozen=True)
class ComponentConstants:
    """Constants of one non-linear component a_{l,j} in C_{m,l,L} (RH Sec. 4, Lemma D.2).

    Attributes:
        bound: m_a = sup ||a(z)||_2 (inf if unbounded).
        lipschitz: l_a, Lipschitz constant of a.
        smoothness: L_a, Lipschitz constant of grad a (inf if a is not C^1).
        value_at_zero: ||a(0)||_2.
        jacobian_at_zero: ||grad a(0)||_{2,2}.
        name: what the component is (for tables and messages).
    """

    bound: float = math.inf
    lipschitz: float = math.inf
    smoothness: float = math.inf
    value_at_zero: float = 0.0
    jacobian_at_zero: float = math.inf
    name: str = ""

    def __post_init__(self) -> None:
        for attr in ("bound", "lipschitz", "smoothness", "value_at_zero", "jacobian_at_zero"):
            label = f"{self.name or 'nonlinear'}.{attr}"
            object.__setattr__(self, attr, _check_constant(getattr(self, attr), label))


@dataclass(frozen=True)
class Layer:
    """One layer phi_l = a_l o b_l of RH eq. (7), by its constants.

    Attributes:
        bilinear: constants of b_l.
        nonlinear: the a_{l,j} in application order (may be empty: the layer ends at b_l).
        name: display name.
        weight_norm: ||v*_l||_2, the layer's current weight norm, used only by
            :meth:`Chain.around_weights` (RH Cor. 4.5). ``None`` when unknown.
        input_operator_norm: an upper bound on ||z -> beta_l(v*_l, z)||, the layer's input map at
            its actual weights (e.g. the spectral norm of W*), or ``None``: then
            L_beta ||v*_l|| is used (docs/tight-constants.md, "Around the weights").
        offset_value_norm: an upper bound on ||beta^v_l(v*_l)|| (e.g. the bias broadcast over the
            batch), or ``None``: then l_beta^v ||v*_l|| is used.
    """

    bilinear: BilinearConstants
    nonlinear: tuple[ComponentConstants, ...] = ()
    name: str = ""
    weight_norm: float | None = None
    input_operator_norm: float | None = None
    offset_value_norm: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "nonlinear", tuple(self.nonlinear))
        for attr in ("weight_norm", "input_operator_norm", "offset_value_norm"):
            if getattr(self, attr) is not None:
                object.__setattr__(self, attr, _check_constant(getattr(self, attr), f"{self.name or 'layer'}.{attr}"))


@dataclass(frozen=True)
class Chain:
    """A chain of tau layers with input norm ||x||_2 (RH Def. 2.1).

    ``radius`` is R of the set C = {w : ||v_l - v*_l||_2 <= R for all l}; v* = 0 unless the
    chain was produced by :meth:`around_weights`.
    """

    layers: tuple[Layer, ...]
    input_norm: float = 1.0
    radius: float = 1.0
    centre: str = field(default="zero")  # "zero" (RH Prop. 4.4) or "weights" (RH Cor. 4.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ChainError("a chain needs at least one layer")
        object.__setattr__(self, "input_norm", _check_constant(self.input_norm, "input_norm"))
        radius = _check_constant(self.radius, "radius")
        if math.isinf(radius):
            raise ChainError("radius must be finite")
        object.__setattr__(self, "radius", radius)

    def with_options(self, *, radius: float | None = None, input_norm: float | None = None) -> "Chain":
        """A copy with another radius and/or input norm (command-line overrides)."""
        return replace(
            self,
            radius=self.radius if radius is None else radius,
            input_norm=self.input_norm if input_norm is None else input_norm,
        )

    def around_weights(self) -> "Chain":
        """The chain on C' = {||v_l - v*_l|| <= R} seen as a chain around 0 (RH Cor. 4.5).

        psi(v* + Delta) is a chain in Delta whose bi-affine parts have
        l_beta^z + L_beta ||v*_l|| in place of l_beta^z and ||beta^0|| + l_beta^v ||v*_l|| in
        place of ||beta^0|| (proof of RH Cor. 4.5). Needs every layer's ``weight_norm``.

        Where a layer knows the norms at its actual weights (``input_operator_norm`` >=
        ||beta(v*, .)||, ``offset_value_norm`` >= ||beta^v(v*)||), those replace L_beta ||v*|| and
        l_beta^v ||v*|| when smaller: b(v* + D, z) = beta(D, z) + [beta(v*, z) + beta^z(z)]
        + beta^v(D) + [beta^v(v*) + beta^0], so the shifted input map and offset have exactly
        these norms (docs/tight-constants.md, "Around the weights").
        """
        if self.centre == "weights":
            raise ChainError("chain is already centred at the weights")
        layers = []
        for index, layer in enumerate(self.layers, start=1):
            if layer.weight_norm is None:
                raise ChainError(
                    f"layer {index} ({layer.name or 'unnamed'}) has no weight_norm: "
                    "balls around the weights (--around-weights) need ||v*_l|| for every layer"
                )
            b, w = layer.bilinear, layer.weight_norm
            z_map, offset = _mul(b.smoothness, w), _mul(b.weight_lipschitz, w)
            if layer.input_operator_norm is not None:
                z_map = min(z_map, layer.input_operator_norm)
            if layer.offset_value_norm is not None:
                offset = min(offset, layer.offset_value_norm)
            shifted = BilinearConstants(
                smoothness=b.smoothness,
                weight_lipschitz=b.weight_lipschitz,
                input_lipschitz=b.input_lipschitz + z_map,
                offset_norm=b.offset_norm + offset,
            )
            layers.append(replace(layer, bilinear=shifted))
        return replace(self, layers=tuple(layers), centre="weights")


def _mul(a: float, b: float) -> float:
    """Product with the convention 0 * inf = 0 (a zero factor removes the term)."""
    if a == 0.0 or b == 0.0:
        return 0.0
    return a * b
