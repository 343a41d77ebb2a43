"""Layer components and their constants (RH Sec. 2.3, Appendix B), in ``paper`` and ``tight`` modes.

Each component is a small frozen dataclass that knows its per-example output shape and declares
its own constants for a batch of ``m`` inputs -- next to its definition, as in Modula.  A chain is
then grouped into RH layers (Def. 2.1): a bi-affine component opens a layer and the non-linear
components that follow it form a_l = a_{l,k} o ... o a_{l,1}; shape-only components (flatten,
reshape, dropout at evaluation) change nothing.

``paper`` reproduces RH Appendix B as printed in the long version (DESIGN.md "paper mode,
precisely"); ``tight`` uses sharper constants proved in ``docs/tight-constants.md``.  Both are
plain arithmetic on shapes: no PyTorch, so VGG-16 at batch 128 is certified in microseconds.

Shapes are per example, e.g. ``(3, 224, 224)`` or ``(784,)``; eta = m x prod(shape) is the size
of a component's input over the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from .chain import BilinearConstants, ChainError, ComponentConstants, Layer

__all__ = [
    "Component",
    "Linear",
    "Conv2d",
    "ChannelAffine",
    "ReLU",
    "Softplus",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "BatchNorm",
    "Flatten",
    "Identity",
    "Custom",
    "build_layers",
    "propagate_shapes",
    "SIGMOID_SMOOTHNESS",
    "BATCHNORM_SMOOTHNESS_FACTOR",
]

SIGMOID_SMOOTHNESS = math.sqrt(3.0) / 18.0  # max |sigma''| = sigma(1-sigma)(1-2 sigma) at sigma = 1/2 -+ 1/(2 sqrt 3)
TANH_SMOOTHNESS = 4.0 / (3.0 * math.sqrt(3.0))  # max |tanh''| at tanh = 1/sqrt(3)


def _bn_factor() -> float:
    # RH Prop. B.2 proof: ||grad^2 g(x)|| <= 3 m^-1/2 eps^-1 sqrt(c)(2c+1)/(c+1)^(5/2) with c = t/eps,
    # maximised at c = (1 + sqrt 5)/4 (the root of 2c^2 - c - 1/2 = 0 ... see docs).
    c = (1.0 + math.sqrt(5.0)) / 4.0
    return 3.0 * math.sqrt(c) * (2.0 * c + 1.0) / (c + 1.0) ** 2.5


BATCHNORM_SMOOTHNESS_FACTOR = _bn_factor()  # ~1.6051


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _check_mode(mode: str) -> None:
    if mode not in ("paper", "tight"):
        raise ChainError(f"unknown constants mode {mode!r}; choose 'paper' or 'tight'")


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    if len(x) == 1:
        return (x[0], x[0])
    if len(x) != 2:
        raise ChainError(f"expected an int or a pair, got {x}")
    return x  # type: ignore[return-value]


def _window_out(size: int, k: int, s: int, p: int, d: int = 1, ceil_mode: bool = False) -> int:
    span = d * (k - 1) + 1
    num = size + 2 * p - span
    if num < 0:
        raise ChainError(f"window of size {span} does not fit an input of size {size} with padding {p}")
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # PyTorch: the last window must start inside the input or left padding
    return out


def _multiplicity_1d(size: int, k: int, s: int, p: int, d: int, n_out: int) -> int:
    """Max over input positions of the number of windows (output positions) reading it."""
    counts = [0] * size
    for o in range(n_out):
        for t in range(k):
            i = o * s - p + t * d
            if 0 <= i < size:
                counts[i] += 1
    return max(counts) if counts else 0


class Component:
    """Base class: one component of a chain, by its shape rule and its constants.

    Subclasses set ``role`` to ``"bilinear"`` (opens an RH layer), ``"nonlinear"`` (one
    a_{l,j}) or ``"shape"`` (changes the shape only) and implement :meth:`output_shape` and
    :meth:`constants`.
    """

    role: ClassVar[str] = "shape"

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def constants(self, shape: tuple[int, ...], batch_size: int, mode: str):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def label(self) -> str:
        return type(self).__name__.lower()


# --------------------------------------------------------------------------- bi-affine parts


@dataclass(frozen=True)
class Linear(Component):
    """Fully connected layer Z~ = W^T Z + w0 1^T (RH eq. 8, App. B.3), on the last dimension.

    L_beta = 1 since ||W^T Z||_F <= ||W||_F ||Z||_F (exact: rank-one W, Z attain it);
    l_beta^v = ||1 (x) w0|| / ||w0|| = sqrt(m x leading positions) with a bias, 0 without.
    Both modes agree (these are exact).
    """

    in_features: int
    out_features: int
    bias: bool = True
    role: ClassVar[str] = "bilinear"

    def output_shape(self, shape):
        if not shape or shape[-1] != self.in_features:
            raise ChainError(
                f"Linear({self.in_features}, {self.out_features}) expects inputs whose last dimension is "
                f"{self.in_features}, got per-example shape {tuple(shape)}"
            )
        return tuple(shape[:-1]) + (self.out_features,)

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        self.output_shape(shape)
        rows = batch_size * _prod(shape[:-1])
        return BilinearConstants(1.0, math.sqrt(rows) if self.bias else 0.0, 0.0, 0.0)

    @property
    def label(self):
        return f"linear({self.in_features}->{self.out_features})"


@dataclass(frozen=True)
class Conv2d(Component):
    """2-D convolution (RH eq. 9, App. B.3) with stride, padding and dilation.

    ``paper``: L_beta = sqrt(n_p) (RH App. B.3, n_p = number of output positions),
    l_beta^v = sqrt(n_p m) with a bias.  ``tight``: L_beta = sqrt(mu) where mu is the patch
    multiplicity, the largest number of output positions whose patch contains one input
    position (docs/tight-constants.md, Sec. "Convolution"); l_beta^v is exact already.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True
    role: ClassVar[str] = "bilinear"

    def __post_init__(self):
        for name in ("kernel_size", "stride", "padding", "dilation"):
            object.__setattr__(self, name, _pair(getattr(self, name)))

    def _out_hw(self, shape):
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise ChainError(
                f"Conv2d({self.in_channels}, {self.out_channels}) expects per-example inputs "
                f"({self.in_channels}, H, W), got {tuple(shape)}"
            )
        return tuple(
            _window_out(shape[1 + i], self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i])
            for i in range(2)
        )

    def output_shape(self, shape):
        return (self.out_channels,) + self._out_hw(shape)

    def multiplicity(self, shape) -> int:
        out = self._out_hw(shape)
        mu = 1
        for i in range(2):
            mu *= _multiplicity_1d(
                shape[1 + i], self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i], out[i]
            )
        return mu

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        out = self._out_hw(shape)
        n_p = out[0] * out[1]
        smooth = math.sqrt(n_p) if mode == "paper" else math.sqrt(self.multiplicity(shape))
        return BilinearConstants(smooth, math.sqrt(n_p * batch_size) if self.bias else 0.0, 0.0, 0.0)

    @property
    def label(self):
        return f"conv{self.kernel_size[0]}x{self.kernel_size[1]}({self.in_channels}->{self.out_channels})"


@dataclass(frozen=True)
class ChannelAffine(Component):
    """Per-channel scale and shift y = gamma (.) z + beta (the affine part of PyTorch's batch norm).

    Bilinear in (gamma, z): ||gamma (.) Z|| <= max|gamma_c| ||Z|| <= ||gamma||_2 ||Z||, so
    L_beta = 1; beta^v broadcasts beta over the batch and positions: l_beta^v = sqrt(m x positions).
    Exact in both modes.
    """

    channels: int
    bias: bool = True
    role: ClassVar[str] = "bilinear"

    def output_shape(self, shape):
        if not shape or shape[0] != self.channels:
            raise ChainError(f"ChannelAffine({self.channels}) expects {self.channels} channels, got shape {tuple(shape)}")
        return shape

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        self.output_shape(shape)
        positions = _prod(shape[1:])
        return BilinearConstants(1.0, math.sqrt(batch_size * positions) if self.bias else 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- non-linear parts


@dataclass(frozen=True)
class ReLU(Component):
    """ReLU: (inf, 1, inf, 0, 1) in both modes (not C^1, so L = inf; RH Sec. 5.1)."""

    role: ClassVar[str] = "nonlinear"

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        return ComponentConstants(math.inf, 1.0, math.inf, 0.0, 1.0, "relu")


@dataclass(frozen=True)
class Softplus(Component):
    """Softplus log(1 + exp(beta x)) / beta (RH App. B.4 with beta = 1).

    (inf, 1, beta/4, log(2) sqrt(eta) / beta, 1/2); all exact, both modes.
    """

    beta: float = 1.0
    role: ClassVar[str] = "nonlinear"

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        eta = batch_size * _prod(shape)
        return ComponentConstants(
            math.inf, 1.0, self.beta / 4.0, math.log(2.0) * math.sqrt(eta) / self.beta, 0.5, "softplus"
        )


@dataclass(frozen=True)
class Sigmoid(Component):
    """Sigmoid (RH App. B.4): paper (sqrt(eta), 1/4, 1/10, sqrt(eta)/2, 1/4); tight L = sqrt(3)/18."""

    role: ClassVar[str] = "nonlinear"

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        eta = batch_size * _prod(shape)
        smooth = 0.1 if mode == "paper" else SIGMOID_SMOOTHNESS
        return ComponentConstants(math.sqrt(eta), 0.25, smooth, math.sqrt(eta) / 2.0, 0.25, "sigmoid")


@dataclass(frozen=True)
class Tanh(Component):
    """Tanh: (sqrt(eta), 1, 4/(3 sqrt 3), 0, 1), exact, both modes."""

    role: ClassVar[str] = "nonlinear"

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        eta = batch_size * _prod(shape)
        return ComponentConstants(math.sqrt(eta), 1.0, TANH_SMOOTHNESS, 0.0, 1.0, "tanh")


@dataclass(frozen=True)
class Softmax(Component):
    """Softmax over the last dimension (k classes), per example (RH App. B.4).

    paper: (sqrt(m'), 2, 4, sqrt(m'/k), 1/k) with m' = m x leading positions; tight: l = 1/2
    (Popoviciu: Var_p(u) <= 1/2 for unit u) and L = 1 (docs/tight-constants.md).
    """

    role: ClassVar[str] = "nonlinear"

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        k = shape[-1]
        rows = batch_size * _prod(shape[:-1])
        lip, smooth = (2.0, 4.0) if mode == "paper" else (0.5, 1.0)
        return ComponentConstants(math.sqrt(rows), lip, smooth, math.sqrt(rows / k), 1.0 / k, "softmax")


@dataclass(frozen=True)
class _Pool2d(Component):
    kernel_size: tuple[int, int]
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] = (0, 0)
    ceil_mode: bool = False
    role: ClassVar[str] = "nonlinear"

    def __post_init__(self):
        object.__setattr__(self, "kernel_size", _pair(self.kernel_size))
        object.__setattr__(self, "stride", self.kernel_size if self.stride is None else _pair(self.stride))
        object.__setattr__(self, "padding", _pair(self.padding))

    def _out_hw(self, shape):
        if len(shape) != 3:
            raise ChainError(f"{type(self).__name__} expects per-example inputs (C, H, W), got {tuple(shape)}")
        return tuple(
            _window_out(shape[1 + i], self.kernel_size[i], self.stride[i], self.padding[i], 1, self.ceil_mode)
            for i in range(2)
        )

    def output_shape(self, shape):
        return (shape[0],) + self._out_hw(shape)

    def multiplicity(self, shape) -> int:
        out = self._out_hw(shape)
        mu = 1
        for i in range(2):
            mu *= _multiplicity_1d(shape[1 + i], self.kernel_size[i], self.stride[i], self.padding[i], 1, out[i])
        return mu


@dataclass(frozen=True)
class MaxPool2d(_Pool2d):
    """Max pooling: (inf, 1, inf, 0, 1) for non-overlapping windows (RH App. B.6).

    Overlapping windows (stride < kernel) make one input the maximum of up to mu windows, so
    l = ||grad a(0)|| = sqrt(mu) there, in both modes (RH is silent; docs/tight-constants.md).
    """

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        lip = math.sqrt(self.multiplicity(shape))
        return ComponentConstants(math.inf, lip, math.inf, 0.0, lip, "maxpool")


@dataclass(frozen=True)
class AvgPool2d(_Pool2d):
    """Average pooling, divisor k = kh x kw (PyTorch's default ``count_include_pad=True``).

    paper: (inf, 1, 0, 0, 1/sqrt(k)) for non-overlapping windows (RH App. B.6 and DESIGN.md);
    tight: l = ||grad a(0)|| = sqrt(mu / k) with mu the window multiplicity (1/sqrt(k) without
    overlap), by Cauchy-Schwarz.  In paper mode, overlapping windows use sqrt(mu/k) for
    ||grad a(0)|| (RH is silent) and keep l = 1 (sound since mu <= k).

    With ``ceil_mode=True`` the last window of an axis may stick out of input + padding; PyTorch
    then divides by the truncated size d < k, so sqrt(mu/k) is no longer a bound (an input read
    only by a window of size 1 is copied).  Both modes then use the Schur bound
    ||A||^2 <= max_i sum_{o reads i} 1/d_o per axis (rows sum to at most 1), and paper mode
    raises l to it if it exceeds 1 (docs/tight-constants.md).
    """

    def _axis_load(self, axis: int, size: int, n_out: int) -> float:
        """max over inputs i of sum over windows o reading i of 1/d_o (PyTorch's divisor d_o)."""
        k, s, p = self.kernel_size[axis], self.stride[axis], self.padding[axis]
        load = [0.0] * size
        for o in range(n_out):
            start = o * s - p
            divisor = min(start + k, size + p) - start  # PyTorch: window clipped to input + padding
            for i in range(max(start, 0), min(start + k, size)):
                load[i] += 1.0 / divisor
        return max(load) if load else 0.0

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        k = self.kernel_size[0] * self.kernel_size[1]
        out = self._out_hw(shape)
        truncated = any(
            (out[i] - 1) * self.stride[i] - self.padding[i] + self.kernel_size[i] > shape[1 + i] + self.padding[i]
            for i in range(2)
        )
        if truncated:
            op_norm = math.sqrt(self._axis_load(0, shape[1], out[0]) * self._axis_load(1, shape[2], out[1]))
        else:
            op_norm = math.sqrt(self.multiplicity(shape) / k)
        lip = max(1.0, op_norm) if mode == "paper" else op_norm
        return ComponentConstants(math.inf, lip, 0.0, 0.0, op_norm, "avgpool")


@dataclass(frozen=True)
class AdaptiveAvgPool2d(Component):
    """PyTorch's adaptive average pooling to ``output_size`` (identity when sizes match).

    Windows [floor(iH/h), ceil((i+1)H/h)) may overlap and differ in size; by Cauchy-Schwarz
    ||P x||^2 <= max_p sum_{o reads p} 1/k_o ||x||^2, computed per axis.  Both modes use this
    bound for l and ||grad a(0)|| (RH treats only non-overlapping pooling).
    """

    output_size: tuple[int, int]
    role: ClassVar[str] = "nonlinear"

    def __post_init__(self):
        object.__setattr__(self, "output_size", _pair(self.output_size))

    def output_shape(self, shape):
        if len(shape) != 3:
            raise ChainError(f"AdaptiveAvgPool2d expects per-example inputs (C, H, W), got {tuple(shape)}")
        return (shape[0],) + self.output_size

    @staticmethod
    def _axis_factor(size: int, out: int) -> float:
        load = [0.0] * size
        for o in range(out):
            start = (o * size) // out
            end = -((-(o + 1) * size) // out)
            for i in range(start, end):
                load[i] += 1.0 / (end - start)
        return max(load)

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        self.output_shape(shape)
        factor = self._axis_factor(shape[1], self.output_size[0]) * self._axis_factor(shape[2], self.output_size[1])
        op_norm = math.sqrt(factor)
        return ComponentConstants(math.inf, op_norm, 0.0, 0.0, op_norm, "adaptive-avgpool")


@dataclass(frozen=True)
class BatchNorm(Component):
    """Batch normalisation without affine part, RH eq. (11) and Prop. B.2.

    ``over="entry"`` normalises each of the d = prod(shape) entries of an example across the
    m examples (RH eq. 11, used by the built-in ``vgg16-bn``); ``over="channel"`` normalises
    each channel across the batch and positions (PyTorch's ``BatchNorm2d``), i.e. RH eq. (11)
    with d = channels and m x positions samples.

    paper (long version, Prop. B.2): (d m, 2 eps^-1/2, 2 d m^-1/2 eps^-1, 0, eps^-1/2).  The short
    version and RH Sec. 5.2 print L = 2 m^-1/2 eps^-1; we follow Prop. B.2 of the long version.
    tight: (sqrt(d m), eps^-1/2, 1.6051 m^-1/2 eps^-1, 0, eps^-1/2), see docs/tight-constants.md.
    """

    eps: float = 1e-5
    over: str = "entry"
    role: ClassVar[str] = "nonlinear"

    def __post_init__(self):
        if not self.eps > 0:
            raise ChainError(f"batch-norm eps must be > 0, got {self.eps}")
        if self.over not in ("entry", "channel"):
            raise ChainError(f"batch-norm 'over' must be 'entry' or 'channel', got {self.over!r}")

    def constants(self, shape, batch_size, mode):
        _check_mode(mode)
        if self.over == "entry":
            d, m = _prod(shape), batch_size
        else:
            d, m = shape[0], batch_size * _prod(shape[1:])
        eps = self.eps
        if mode == "paper":
            return ComponentConstants(
                d * m, 2.0 / math.sqrt(eps), 2.0 * d / (math.sqrt(m) * eps), 0.0, 1.0 / math.sqrt(eps), "batchnorm"
            )
        return ComponentConstants(
            math.sqrt(d * m),
            1.0 / math.sqrt(eps),
            BATCHNORM_SMOOTHNESS_FACTOR / (math.sqrt(m) * eps),
            0.0,
            1.0 / math.sqrt(eps),
            "batchnorm",
        )


# --------------------------------------------------------------------------- shape-only parts


@dataclass(frozen=True)
class Flatten(Component):
    """Flatten dimensions ``start_dim..end_dim`` of an example (1-based like PyTorch's, batch excluded)."""

    start_dim: int = 1
    end_dim: int = -1

    def output_shape(self, shape):
        full = (1,) + tuple(shape)
        start = self.start_dim % len(full)
        end = self.end_dim % len(full)
        if start == 0:
            raise ChainError("Flatten over the batch dimension is not a per-example reshape")
        return tuple(full[1:start]) + (_prod(full[start : end + 1]),) + tuple(full[end + 1 :])


@dataclass(frozen=True)
class Identity(Component):
    """Identity (also Dropout at evaluation): changes nothing."""


@dataclass(frozen=True)
class Custom(Component):
    """A user-declared component with fixed constants (the registry's escape hatch).

    ``constants_fn(shape, batch_size, mode)`` returns :class:`BilinearConstants` (``role`` =
    "bilinear") or :class:`ComponentConstants` (``role`` = "nonlinear"); ``shape_fn`` maps the
    per-example shape (identity by default).
    """

    name: str
    kind: str
    constants_fn: object
    shape_fn: object = None

    def __post_init__(self):
        if self.kind not in ("bilinear", "nonlinear", "shape"):
            raise ChainError(f"Custom component kind must be bilinear, nonlinear or shape, got {self.kind!r}")

    @property
    def role(self):  # type: ignore[override]
        return self.kind

    def output_shape(self, shape):
        return tuple(self.shape_fn(shape)) if self.shape_fn is not None else shape

    def constants(self, shape, batch_size, mode):
        return self.constants_fn(shape, batch_size, mode)

    @property
    def label(self):
        return self.name


# --------------------------------------------------------------------------- grouping into layers


def propagate_shapes(components: Sequence[Component], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-example input shape of every component (by the components' own shape rules)."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ChainError(f"input shape must be positive integers, got {tuple(input_shape)}")
    shapes = []
    for c in components:
        shapes.append(shape)
        shape = tuple(c.output_shape(shape))
    shapes.append(shape)
    return shapes


def build_layers(
    components: Sequence[Component],
    shapes: Sequence[tuple[int, ...]],
    batch_size: int,
    mode: str,
    names: Sequence[str] | None = None,
    weight_norms: Sequence[float | None] | None = None,
) -> list[Layer]:
    """Group components into RH layers (Def. 2.1, eq. 7) with their constants.

    ``shapes[i]`` is the input shape of ``components[i]``.  A bi-affine component opens a layer;
    non-linear components join the current one.  Non-linear components before the first
    bi-affine one form a parameter-free layer with b = identity (l_beta^z = 1).
    ``weight_norms[i]`` is the norm of the parameters of bi-affine component i (RH Cor. 4.5).
    """
    _check_mode(mode)
    if batch_size < 1:
        raise ChainError(f"batch size must be >= 1, got {batch_size}")
    layers: list[Layer] = []
    current = None  # [bilinear, [nonlinear...], name, weight_norm]
    for i, comp in enumerate(components):
        role = comp.role
        name = names[i] if names is not None else comp.label
        if role == "shape":
            continue
        consts = comp.constants(shapes[i], batch_size, mode)
        if role == "bilinear":
            if not isinstance(consts, BilinearConstants):
                raise ChainError(f"component {name!r} is bi-affine but its constants are {type(consts).__name__}")
            if current is not None:
                layers.append(Layer(current[0], tuple(current[1]), current[2], current[3]))
            wn = weight_norms[i] if weight_norms is not None else None
            current = [consts, [], name, wn]
        elif role == "nonlinear":
            if not isinstance(consts, ComponentConstants):
                raise ChainError(f"component {name!r} is non-linear but its constants are {type(consts).__name__}")
            if current is None:
                current = [BilinearConstants(0.0, 0.0, 1.0, 0.0), [], "input", 0.0]
            if not consts.name:
                consts = ComponentConstants(
                    consts.bound, consts.lipschitz, consts.smoothness, consts.value_at_zero, consts.jacobian_at_zero, name
                )
            current[1].append(consts)
        else:
            raise ChainError(f"component {name!r} has unknown role {role!r}")
    if current is not None:
        layers.append(Layer(current[0], tuple(current[1]), current[2], current[3]))
    if not layers:
        raise ChainError("the model has no layer with parameters or non-linear part to certify")
    return layers
