"""Layer components and their constants (RH Sec. 2.3, Appendix B), in ``paper`` and ``tight`` modes.

Each component is a small frozen dataclass that declares everything about itself in one place,
next to its definition (as Modula's atoms and BackPACK's derivatives do): its per-example output
shape, its constants for a batch of ``m`` inputs, the PyTorch module types it stands for
(``torch_types``, :meth:`Component.from_torch`, :meth:`Component.to_torch`) and, for
element-wise activations (:class:`Elementwise`), the scalar facts -- sup |a|, sup |a'|,
sup |a''|, |a(0)|, |a'(0)| -- from which both RH's constants and F's (DSGD's) are derived, and
the functional forward.  Registering a new layer type is one class (``docs/registry.md``).  A chain is
then grouped into RH layers (Def. 2.1): a bi-affine component opens a layer and the non-linear
components that follow it form a_l = a_{l,k} o ... o a_{l,1}; shape-only components (flatten,
reshape, dropout at evaluation) change nothing.

``paper`` reproduces RH Appendix B as printed in the long version (DESIGN.md "paper mode,
precisely"); ``tight`` uses sharper constants proved in ``docs/tight-constants.md``.  Both are
plain arithmetic on shapes: no PyTorch is imported here (``to_torch`` and ``function`` import it
when called), so VGG-16 at batch 128 is certified in microseconds.

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
    "Elementwise",
    "ScalarFacts",
    "UnsupportedModuleError",
    "COMPONENT_TYPES",
    "WeightNorms",
    "conv_operator_bound",
    "Unflatten",
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
    "layer_spans",
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


class UnsupportedModuleError(ChainError):
    """A module type with no registered constants, or a configuration a component cannot take."""


@dataclass(frozen=True)
class WeightNorms:
    """Exact norms of a bi-affine component at its actual parameters v* (upper bounds up to a
    rounding margin): ``input_operator`` >= ||z -> beta(v*, z)||_op over the batch and
    ``offset`` >= ||beta^v(v*)||_2 (e.g. the bias broadcast over the batch)."""

    input_operator: float
    offset: float


#: relative margin on norms computed in float64 (singular values are backward stable: the
#: computed sigma is within ~n eps ||A|| of the exact one; 1e-9 covers n up to ~10^6)
NORM_MARGIN = 1e-9


def _upper(x: float) -> float:
    return float(x) * (1.0 + NORM_MARGIN) + 1e-300


def _bias_offset(bias, rows: int) -> float:
    """||b 1^T||_F = sqrt(rows) ||b||: a bias broadcast over ``rows`` positions of the batch."""
    if bias is None:
        return 0.0
    return _upper(math.sqrt(rows) * float(bias.detach().double().norm()))


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
    :meth:`constants`.  ``torch_types`` lists the PyTorch module types the component stands for:
    names in ``torch.nn`` (``"Linear"``), dotted paths (``"pkg.module.Type"``) -- so that this
    module needs no PyTorch -- or the types themselves; :meth:`from_torch` reads such a module,
    :meth:`to_torch` builds one.
    """

    role: ClassVar[str] = "shape"
    torch_types: ClassVar[tuple] = ()

    @classmethod
    def from_torch(cls, module, shape: tuple[int, ...]) -> "Component | Sequence[Component]":
        """The component(s) of the PyTorch ``module`` on per-example inputs of shape ``shape``."""
        return cls()

    def to_torch(self):
        """A PyTorch module computing this component (built-in models, tests)."""
        raise ChainError(f"no PyTorch module for component {self!r}")

    def entry_norms_at(self, weight, z) -> "tuple[float, float] | None":
        """For a bi-affine component with weights ``weight`` on the batch ``z``: (the largest
        norm of the slice of ``z`` that one output entry reads, the largest norm of the weights
        that produce one output entry) -- each output entry is <weights, slice> (+ a bias), so
        |beta(e, z)_i + beta^v(e)_i| <= ||e|| sqrt(slice^2 + 1) and |beta(v, h)_i| <= row ||h||
        (docs/local.md, per-entry bounds); None if unknown."""
        return None

    def batch_gain_at(self, z, bias: bool) -> "float | None":
        """For a bi-affine component on the batch ``z``: an upper bound on
        sup ||beta(e_W, z) + beta^v(e_b)|| over ||(e_W, e_b)|| = 1 -- the spectral norm of the
        batch matrix that multiplies the weights, with a column of ones for the bias (local
        certificates, docs/local.md, "weight gain"); None if unknown."""
        return None

    def weight_norms_at(self, weight, bias, shape: tuple[int, ...], batch_size: int) -> "WeightNorms | None":
        """For a bi-affine component with parameters (``weight``, ``bias``) = v*: upper bounds on
        ||z -> beta(v*, z)|| and ||beta^v(v*)|| (:class:`WeightNorms`), used by ``tight`` balls
        around the weights (docs/tight-constants.md, "Around the weights"); None if unknown."""
        return None

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def constants(self, shape: tuple[int, ...], batch_size: int, mode: str):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def label(self) -> str:
        return type(self).__name__.lower()


# --------------------------------------------------------------------------- bi-affine parts


#: entries of one chunk of patches when a batch's patch matrix is built piece by piece
PATCH_CHUNK_ENTRIES = 1 << 25


def _augmented_spectral_norm(rows, bias: bool) -> float:
    """||[rows, 1]||_2 (with the column of ones if ``bias``), float64, with the margin of _upper;
    by the Gram matrix of the smaller side (the norm of a tall matrix)."""
    import torch

    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
    if rows.numel() == 0:
        return 0.0
    gram = rows.T @ rows if rows.shape[0] >= rows.shape[1] else rows @ rows.T
    return _gram_spectral_norm(gram, float(rows.pow(2).sum()))


def _gram_spectral_norm(gram, frobenius2: float) -> float:
    """sqrt(lambda_max(gram)) for gram = A^T A (or A A^T) with ||A||_F^2 = ``frobenius2``, with
    the margin of _upper: eigvalsh is backward stable, |error| <= c u ||gram|| <= c u ||A||_F^2."""
    import torch

    top = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0))
    return _upper(math.sqrt(top + 1e-12 * frobenius2))


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
    torch_types: ClassVar[tuple] = ("Linear",)

    @classmethod
    def from_torch(cls, module, shape):
        return cls(module.in_features, module.out_features, module.bias is not None)

    def to_torch(self):
        from torch import nn

        return nn.Linear(self.in_features, self.out_features, bias=self.bias)

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

    def batch_gain_at(self, z, bias):
        """||[Z, 1]||_2 with Z the rows of z (one per example and leading position): the output
        e_W^T Z + e_b 1^T has Frobenius norm <= ||[Z, 1]||_2 ||(e_W, e_b)||_F."""
        return _augmented_spectral_norm(z.detach().double().reshape(-1, self.in_features), bias)

    def entry_norms_at(self, weight, z):
        """Output (n, i) reads the row z_n (all its inputs); its weights are W_i."""
        z, W = z.detach().double(), weight.detach().double()
        return _upper(float(z.reshape(-1, self.in_features).norm(dim=1).max())), _upper(float(W.norm(dim=1).max()))

    def weight_norms_at(self, weight, bias, shape, batch_size):
        """||W*||_2 (exact, float64 SVD) and sqrt(rows) ||b*||."""
        import torch

        op = float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))
        return WeightNorms(_upper(op), _bias_offset(bias, batch_size * _prod(shape[:-1])))

    @property
    def label(self):
        return f"linear({self.in_features}->{self.out_features})"


def _conv_padding(module) -> tuple[int, int]:
    """PyTorch's padding of a Conv2d as two ints (``"same"`` needs an odd dilated kernel)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedModuleError(
                    f"{module} uses padding='same' with an even kernel: asymmetric padding is not supported")
            pads.append(total // 2)
        return tuple(pads)  # type: ignore[return-value]
    return tuple(module.padding)  # type: ignore[return-value]


def conv_operator_bound(weight, dilation=(1, 1), multiplicity_root: float | None = None, grid: int = 128,
                        max_work: float = 2e9) -> float:
    """A sound upper bound on the operator norm of a zero-padded 2-D convolution with kernel
    ``weight`` (c_out, c_in, kh, kw), any stride and padding (docs/tight-constants.md, "Around
    the weights"), the least of:

    * ``multiplicity_root`` x ||W||_F (the tight L_beta times the kernel norm), if given;
    * sum_{i,j} ||W[:, :, i, j]||_2: the convolution is sum over offsets of a channel map
      followed by a shift-and-restrict, a partial isometry;
    * sup over the frequency torus of ||K(theta)||_2, K(theta) = sum_{i,j} W[:, :, i, j]
      e^{-i theta . o_ij} the symbol (a restriction of the bi-infinite Toeplitz operator, whose
      norm is that sup), from a ``grid`` x ``grid`` sample of the torus plus the Lipschitz margin
      (pi / grid) sum_ij ||W_ij||_2 (|o_ij,1| + |o_ij,2|) with offsets o taken from the kernel's
      centre -- computed only when about ``max_work`` flops or fewer are needed.

    Computed in float64 with the relative margin :data:`NORM_MARGIN`.
    """
    import torch

    W = weight.detach().double()
    c_out, c_in, kh, kw = W.shape
    dh, dw = dilation
    per_offset = torch.linalg.matrix_norm(W.permute(2, 3, 0, 1), ord=2)  # (kh, kw)
    best = float(per_offset.sum())
    if multiplicity_root is not None:
        best = min(best, multiplicity_root * float(W.norm()))
    work = grid * grid * c_out * c_in * min(c_out, c_in) * 10
    if work <= max_work and grid > max((kh - 1) * dh, (kw - 1) * dw):
        padded = W.new_zeros(c_out, c_in, grid, grid)
        padded[:, :, : (kh - 1) * dh + 1 : dh, : (kw - 1) * dw + 1 : dw] = W
        symbol = torch.fft.fft2(padded).permute(2, 3, 0, 1)  # (grid, grid, c_out, c_in)
        sampled = float(torch.linalg.matrix_norm(symbol, ord=2).max())
        ii = (torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2).abs() * dh
        jj = (torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2).abs() * dw
        margin = math.pi / grid * float((per_offset * (ii[:, None] + jj[None, :])).sum())
        best = min(best, sampled + margin)
    return _upper(best)


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
    torch_types: ClassVar[tuple] = ("Conv2d",)

    def __post_init__(self):
        for name in ("kernel_size", "stride", "padding", "dilation"):
            object.__setattr__(self, name, _pair(getattr(self, name)))

    @classmethod
    def from_torch(cls, module, shape):
        if module.groups != 1:
            raise UnsupportedModuleError(
                f"{module}: grouped convolutions (groups={module.groups}) are not supported; register a converter")
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError(f"{module}: padding_mode={module.padding_mode!r} is not supported, only 'zeros'")
        return cls(module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(module.stride),
                   _conv_padding(module), tuple(module.dilation), module.bias is not None)

    def to_torch(self):
        from torch import nn

        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias)

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

    def batch_gain_at(self, z, bias):
        """||[U, 1]||_2 with U the patches of z (one row per example and output position, zero
        padded): the convolution with e_W plus e_b is U e_W^T + 1 e_b^T, position by position."""
        import torch

        z = z.detach()
        m, (p_h, p_w) = z.shape[0], self._out_hw(tuple(z.shape[1:]))
        width = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        per = max(1, PATCH_CHUNK_ENTRIES // max(1, width * p_h * p_w))  # examples per chunk of patches
        if per >= m:
            patches = torch.nn.functional.unfold(z.double(), self.kernel_size, self.dilation, self.padding,
                                                 self.stride)  # (m, C k^2, P)
            return _augmented_spectral_norm(patches.transpose(1, 2).reshape(-1, width), bias)
        # a batch too large for its patch matrix: [U, 1]^T [U, 1] summed chunk by chunk of examples
        gram, frobenius2 = None, 0.0
        for part in z.split(per):
            rows = torch.nn.functional.unfold(part.double(), self.kernel_size, self.dilation, self.padding,
                                              self.stride).transpose(1, 2).reshape(-1, width)
            if bias:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            g = rows.T @ rows
            gram = g if gram is None else gram.add_(g)
            frobenius2 += float(rows.pow(2).sum())
        return _gram_spectral_norm(gram, frobenius2)

    def entry_norms_at(self, weight, z):
        """Output (n, c, p) reads the patch of z_n at p (zero padded); its weights are W_c.  The
        squared patch norms are the convolution of sum_c z_c^2 with a kernel of ones."""
        import torch

        z, W = z.detach(), weight.detach().double()
        ones = z.new_ones(1, 1, *self.kernel_size, dtype=torch.float64)
        squares = torch.cat([torch.nn.functional.conv2d(part.double().pow(2).sum(1, keepdim=True), ones,
                                                         stride=self.stride, padding=self.padding,
                                                         dilation=self.dilation).flatten()
                             for part in z.split(max(1, PATCH_CHUNK_ENTRIES // max(1, z[0].numel())))])
        return (_upper(math.sqrt(float(squares.max().clamp_min(0.0)))),
                _upper(float(W.flatten(1).norm(dim=1).max())))

    def weight_norms_at(self, weight, bias, shape, batch_size):
        """An upper bound on the operator norm of the convolution with kernel W*, the least of
        sqrt(mu) ||W*||_F, sum_offsets ||W*[:, :, i, j]||_2 and the sampled symbol bound
        (:func:`conv_operator_bound`); the bias broadcast over the n_p output positions."""
        out = self._out_hw(shape)
        op = conv_operator_bound(weight, self.dilation, math.sqrt(self.multiplicity(shape)))
        return WeightNorms(op, _bias_offset(bias, batch_size * out[0] * out[1]))

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

    def entry_norms_at(self, weight, z):
        """Output entry i is gamma_c z_i (+ beta_c): it reads one entry of z."""
        return _upper(float(z.detach().double().abs().max())), _upper(float(weight.detach().double().abs().max()))

    def weight_norms_at(self, weight, bias, shape, batch_size):
        """max_c |gamma*_c| (the scaling is diagonal) and beta* broadcast over the batch and positions."""
        op = float(weight.detach().double().abs().max()) if weight is not None else 1.0
        return WeightNorms(_upper(op), _bias_offset(bias, batch_size * _prod(shape[1:])))


# --------------------------------------------------------------------------- non-linear parts


@dataclass(frozen=True)
class ScalarFacts:
    """Facts of a scalar function a : R -> R (an activation applied entry by entry).

    ``bound`` = sup |a| (inf if unbounded), ``d1`` = sup |a'|, ``d2`` = sup |a''| (inf if a' is
    not Lipschitz), ``at_zero`` = |a(0)|, ``d1_at_zero`` = |a'(0)|.
    """

    bound: float
    d1: float
    d2: float
    at_zero: float
    d1_at_zero: float


class Elementwise(Component):
    """An activation a applied to every entry: one class per activation declares its
    :class:`ScalarFacts` (``facts``, and ``paper_facts`` where RH prints other values), its
    PyTorch types and its functional forward :meth:`function`.

    RH's constants follow (App. B.4; eta = m x prod(shape) entries over the batch, Euclidean
    norms over the whole batch): bound sqrt(eta) sup|a|, Lipschitz sup|a'|, smoothness sup|a''|
    (the Jacobian is diag(a'(z)), and ||(a'(z) - a'(z')) (.) h|| <= max_i |a'(z_i) - a'(z'_i)| ||h||
    <= sup|a''| ||z - z'|| ||h||), value at zero sqrt(eta) |a(0)|, Jacobian at zero |a'(0)|.  F's activation constants (Assumption 4.1 i,
    DSGD) are (sup|a|, sup|a'|, sup|a''|) of the tight facts.
    """

    role: ClassVar[str] = "nonlinear"
    facts: ClassVar[ScalarFacts]
    paper_facts: ClassVar[ScalarFacts | None] = None
    #: every point where |a'| (resp. |a''|) has a local maximum; with them :meth:`sup_on` takes
    #: sups over intervals (local certificates, docs/local.md); ``None``: unknown, the global
    #: facts are used
    d1_peaks: ClassVar[tuple[float, ...] | None] = None
    d2_peaks: ClassVar[tuple[float, ...] | None] = None
    #: sup |a'''| and the points where |a'''| has a local maximum (segment certificates,
    #: docs/segment.md); ``None``: unknown, segment certificates refuse the activation
    d3: ClassVar[float | None] = None
    d3_peaks: ClassVar[tuple[float, ...] | None] = None

    def sups_on(self, lo, hi) -> tuple[float, float, float]:
        """(sup |a'|, sup |a''|, sup |a'''|) over the union of the intervals [lo_i, hi_i], as
        :meth:`sup_on` (ends and interior local maxima of each |a^(k)|, float64, relative margin
        1e-9, never above the global sups); raises if the activation declares no ``d3``."""
        if self.d3 is None or self.d3_peaks is None:
            raise ChainError(f"{type(self).__name__} declares no third-derivative facts (d3, d3_peaks)")
        return self._sups(lo, hi, 3)

    def sup_on(self, lo, hi) -> tuple[float, float]:
        """(sup |a'|, sup |a''|) over the union of the intervals [lo_i, hi_i] (tensors of the same
        shape): |g| restricted to an interval is largest at an end or at one of its interior local
        maxima (``d1_peaks``, ``d2_peaks``), so the sup is a max over finitely many points, taken
        in float64 with a relative margin of 1e-9.  Never above the global facts."""
        return self._sups(lo, hi, 2)

    def _sups(self, lo, hi, orders: int):
        import torch

        f = self.facts
        lo, hi = lo.detach().double().reshape(-1), hi.detach().double().reshape(-1)
        ends = self.derivatives(torch.cat([lo, hi]), orders)
        table = ((self.d1_peaks, f.d1), (self.d2_peaks, f.d2), (self.d3_peaks, self.d3))[:orders]
        sups = []
        for order, (values, (peaks, glob)) in enumerate(zip(ends, table)):
            if peaks is None:
                sups.append(glob)
                continue
            inside = [float(c) for c in peaks if bool(((lo <= c) & (c <= hi)).any())]
            if inside:  # the peaks some interval contains
                at_peaks = self.derivatives(torch.tensor(inside, dtype=torch.float64), orders)[order]
                values = torch.cat([values, at_peaks])
            best = float(values.abs().max()) if values.numel() else 0.0
            sups.append(min(glob, best * (1 + 1e-9)))
        return tuple(sups)

    def derivatives(self, t, orders: int = 2):
        """(a'(t), ..., a^(orders)(t)) entry-wise (float64); by autograd on :meth:`function`
        unless the activation writes them in closed form (tests/test_segment.py compares)."""
        return self._autograd_derivatives(t, orders)

    def _autograd_derivatives(self, t, orders: int):
        import torch

        t = t.detach().double().requires_grad_(True)
        out = []
        with torch.enable_grad():
            g = self.function(t)
            for k in range(orders):
                g = torch.autograd.grad(g.sum(), t, create_graph=k < orders - 1, allow_unused=True)[0]
                if g is None:  # a polynomial of lower degree: the rest vanish
                    out += [torch.zeros_like(t)] * (orders - k)
                    break
                out.append(g)
        return tuple(d.detach() for d in out)

    def scalar_facts(self, mode: str = "tight") -> ScalarFacts:
        """The facts used by ``mode`` (``paper`` falls back to the tight ones where RH agrees)."""
        _check_mode(mode)
        return (self.paper_facts or self.facts) if mode == "paper" else self.facts

    def constants(self, shape, batch_size, mode):
        f = self.scalar_facts(mode)
        root = math.sqrt(batch_size * _prod(shape))
        return ComponentConstants(_mul0(f.bound, root), f.d1, f.d2, _mul0(f.at_zero, root), f.d1_at_zero, self.label)

    def function(self, x):
        """a(x) entry-wise, on a tensor (the functional forward)."""
        raise NotImplementedError(f"{type(self).__name__} declares no function")

    def to_torch(self):
        """The first of ``torch_types`` with its default arguments, else a module applying
        :meth:`function`."""
        from torch import nn

        if self.torch_types:  # the first declared type, built with its defaults
            from .torch_chain import resolve_torch_type

            return resolve_torch_type(self.torch_types[0])()
        component = self

        class _Apply(nn.Module):
            def forward(self, x):
                return component.function(x)

        _Apply.__name__ = type(self).__name__
        return _Apply()


def _mul0(a: float, b: float) -> float:
    """a x b with 0 x inf = 0 (an unbounded activation's value at zero times sqrt(eta))."""
    return 0.0 if a == 0 or b == 0 else a * b


@dataclass(frozen=True)
class ReLU(Elementwise):
    """ReLU: (inf, 1, inf, 0, 1) in both modes (not C^1, so L = inf; RH Sec. 5.1)."""

    facts: ClassVar[ScalarFacts] = ScalarFacts(math.inf, 1.0, math.inf, 0.0, 1.0)
    torch_types: ClassVar[tuple] = ("ReLU",)

    def function(self, x):
        return x.clamp_min(0)

    def sup_on(self, lo, hi):
        """On intervals away from the kink ReLU is linear: a' in {0, 1}, a'' = 0; an interval
        that reaches 0 from both sides keeps L = inf."""
        lo, hi = lo.detach().reshape(-1), hi.detach().reshape(-1)
        d1 = 1.0 if bool((hi > 0).any()) else 0.0
        d2 = math.inf if bool(((lo <= 0) & (hi >= 0) & (lo < hi)).any()) else 0.0
        return d1, d2


@dataclass(frozen=True)
class Softplus(Elementwise):
    """Softplus log(1 + exp(beta x)) / beta (RH App. B.4 with beta = 1).

    (inf, 1, beta/4, log(2) sqrt(eta) / beta, 1/2); all exact, both modes.
    """

    beta: float = 1.0
    torch_types: ClassVar[tuple] = ("Softplus",)
    d1_peaks: ClassVar[tuple[float, ...]] = ()  # a' = sigma(beta x) is increasing
    d2_peaks: ClassVar[tuple[float, ...]] = (0.0,)  # a'' = beta sigma (1 - sigma)

    # a''' = beta^2 sigma''(beta x): |sigma''| peaks at beta x = -+ log(2 + sqrt 3), value sqrt(3)/18
    @property
    def d3(self) -> float:  # type: ignore[override]
        return self.beta ** 2 * SIGMOID_SMOOTHNESS

    @property
    def d3_peaks(self) -> tuple[float, ...]:  # type: ignore[override]
        c = math.log(2 + math.sqrt(3)) / self.beta
        return (-c, c)

    @property
    def facts(self) -> ScalarFacts:  # type: ignore[override]
        return ScalarFacts(math.inf, 1.0, self.beta / 4.0, math.log(2.0) / self.beta, 0.5)

    @classmethod
    def from_torch(cls, module, shape):
        return cls(float(module.beta))

    def function(self, x):
        import torch

        # log(1 + e^{beta x}) / beta without overflow (softplus with threshold=inf overflows for
        # beta x > 709); its autograd derivative is sigma(beta x) everywhere
        return torch.logaddexp(self.beta * x, torch.zeros_like(x)) / self.beta

    def derivatives(self, t, orders: int = 2):
        """a' = sigma(beta t), a'' = beta s, a''' = beta^2 s (1 - 2 sigma), s = sigma (1 - sigma)."""
        sig = (self.beta * t.detach().double()).sigmoid()
        s = sig * (1 - sig)
        return (sig, self.beta * s, self.beta ** 2 * s * (1 - 2 * sig))[:orders]

    def to_torch(self):
        from torch import nn

        return nn.Softplus(beta=self.beta, threshold=math.inf)


@dataclass(frozen=True)
class Sigmoid(Elementwise):
    """Sigmoid (RH App. B.4): paper (sqrt(eta), 1/4, 1/10, sqrt(eta)/2, 1/4); tight L = sqrt(3)/18,
    the exact max |sigma''|."""

    facts: ClassVar[ScalarFacts] = ScalarFacts(1.0, 0.25, SIGMOID_SMOOTHNESS, 0.5, 0.25)
    paper_facts: ClassVar[ScalarFacts] = ScalarFacts(1.0, 0.25, 0.1, 0.5, 0.25)
    torch_types: ClassVar[tuple] = ("Sigmoid",)
    d1_peaks: ClassVar[tuple[float, ...]] = (0.0,)
    # |sigma''| = sigma (1 - sigma) |1 - 2 sigma| peaks at sigma = 1/2 -+ 1/(2 sqrt 3), x = -+ log(2 + sqrt 3)
    d2_peaks: ClassVar[tuple[float, ...]] = (-math.log(2 + math.sqrt(3)), math.log(2 + math.sqrt(3)))
    # sigma''' = s (1 - 6 s) with s = sigma (1 - sigma) in (0, 1/4]: |.| is 1/8 at x = 0 and has
    # its other local maxima 1/24 at s = 1/12, sigma = (1 -+ sqrt(2/3)) / 2
    d3: ClassVar[float] = 0.125
    d3_peaks: ClassVar[tuple[float, ...]] = (
        0.0, -math.log((1 + math.sqrt(2 / 3)) / (1 - math.sqrt(2 / 3))),
        math.log((1 + math.sqrt(2 / 3)) / (1 - math.sqrt(2 / 3))))

    def function(self, x):
        return x.sigmoid()

    def derivatives(self, t, orders: int = 2):
        """sigma' = s, sigma'' = s (1 - 2 sigma), sigma''' = s (1 - 6 s), s = sigma (1 - sigma)."""
        sig = t.detach().double().sigmoid()
        s = sig * (1 - sig)
        return (s, s * (1 - 2 * sig), s * (1 - 6 * s))[:orders]


@dataclass(frozen=True)
class Tanh(Elementwise):
    """Tanh: (sqrt(eta), 1, 4/(3 sqrt 3), 0, 1), exact, both modes."""

    facts: ClassVar[ScalarFacts] = ScalarFacts(1.0, 1.0, TANH_SMOOTHNESS, 0.0, 1.0)
    torch_types: ClassVar[tuple] = ("Tanh",)
    d1_peaks: ClassVar[tuple[float, ...]] = (0.0,)
    # |tanh''| = 2 |tanh| (1 - tanh^2) peaks at tanh = -+ 1/sqrt 3
    d2_peaks: ClassVar[tuple[float, ...]] = (-math.atanh(1 / math.sqrt(3)), math.atanh(1 / math.sqrt(3)))
    # tanh''' = -2 (1 - s)(1 - 3 s) with s = tanh^2: |.| is 2 at x = 0 and has its other local
    # maxima 2/3 at s = 2/3
    d3: ClassVar[float] = 2.0
    d3_peaks: ClassVar[tuple[float, ...]] = (0.0, -math.atanh(math.sqrt(2 / 3)), math.atanh(math.sqrt(2 / 3)))

    def function(self, x):
        return x.tanh()

    def derivatives(self, t, orders: int = 2):
        """tanh' = 1 - a^2, tanh'' = -2 a (1 - a^2), tanh''' = -2 (1 - a^2)(1 - 3 a^2), a = tanh."""
        a = t.detach().double().tanh()
        d1 = 1 - a * a
        return (d1, -2 * a * d1, -2 * d1 * (1 - 3 * a * a))[:orders]


@dataclass(frozen=True)
class Softmax(Component):
    """Softmax over the last dimension (k classes), per example (RH App. B.4).

    paper: (sqrt(m'), 2, 4, sqrt(m'/k), 1/k) with m' = m x leading positions; tight: l = 1/2
    (Popoviciu: Var_p(u) <= 1/2 for unit u) and L = 1 (docs/tight-constants.md).
    """

    role: ClassVar[str] = "nonlinear"
    torch_types: ClassVar[tuple] = ("Softmax",)

    @classmethod
    def from_torch(cls, module, shape):
        ndim = len(shape) + 1
        if module.dim is None or module.dim % ndim != ndim - 1:
            raise UnsupportedModuleError(f"{module}: softmax must act on the last dimension (dim=-1 or {ndim - 1})")
        return cls()

    def to_torch(self):
        from torch import nn

        return nn.Softmax(dim=-1)

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

    @classmethod
    def from_torch(cls, module, shape):
        if getattr(module, "dilation", 1) not in (1, (1, 1)):
            raise UnsupportedModuleError(f"{module}: dilated pooling is not supported")
        return cls(module.kernel_size, module.stride, module.padding, module.ceil_mode)

    def to_torch(self):
        from torch import nn

        return getattr(nn, type(self).__name__)(self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode)

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

    torch_types: ClassVar[tuple] = ("MaxPool2d",)

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

    torch_types: ClassVar[tuple] = ("AvgPool2d",)

    @classmethod
    def from_torch(cls, module, shape):
        if not module.count_include_pad and module.padding not in (0, (0, 0)):
            raise UnsupportedModuleError(f"{module}: count_include_pad=False with padding is not supported")
        if module.divisor_override is not None:
            raise UnsupportedModuleError(f"{module}: divisor_override is not supported")
        return super().from_torch(module, shape)

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
    torch_types: ClassVar[tuple] = ("AdaptiveAvgPool2d",)

    @classmethod
    def from_torch(cls, module, shape):
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(tuple(shape[1 + i] if s is None else s for i, s in enumerate(size)))

    def to_torch(self):
        from torch import nn

        return nn.AdaptiveAvgPool2d(self.output_size)

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
    torch_types: ClassVar[tuple] = ("BatchNorm1d", "BatchNorm2d", "smoothchain.torch_chain.EntryBatchNorm")

    @classmethod
    def from_torch(cls, module, shape):
        """PyTorch's batch norm: the normalisation, then (if ``affine``) a :class:`ChannelAffine`;
        smoothchain's ``EntryBatchNorm``: RH eq. (11) per entry."""
        if not hasattr(module, "affine"):  # EntryBatchNorm
            return cls(module.eps, over="entry")
        out: list[Component] = [cls(module.eps, over="entry" if len(shape) == 1 else "channel")]
        if module.affine:
            out.append(ChannelAffine(module.num_features, bias=True))
        return out

    def to_torch(self):
        if self.over != "entry":
            raise ChainError("only per-entry batch norm has a built-in module (EntryBatchNorm)")
        from .torch_chain import EntryBatchNorm

        return EntryBatchNorm(self.eps)

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
    torch_types: ClassVar[tuple] = ("Flatten",)

    @classmethod
    def from_torch(cls, module, shape):
        if module.start_dim == 0:
            raise UnsupportedModuleError(f"{module}: flattening the batch dimension mixes examples")
        return cls(module.start_dim, module.end_dim)

    def to_torch(self):
        from torch import nn

        return nn.Flatten(self.start_dim, self.end_dim)

    def output_shape(self, shape):
        full = (1,) + tuple(shape)
        start = self.start_dim % len(full)
        end = self.end_dim % len(full)
        if start == 0:
            raise ChainError("Flatten over the batch dimension is not a per-example reshape")
        return tuple(full[1:start]) + (_prod(full[start : end + 1]),) + tuple(full[end + 1 :])


@dataclass(frozen=True)
class Identity(Component):
    """Identity (also Dropout, certified at evaluation where p has no effect): changes nothing."""

    torch_types: ClassVar[tuple] = ("Identity", "Dropout")

    def to_torch(self):
        from torch import nn

        return nn.Identity()


@dataclass(frozen=True)
class Unflatten(Component):
    """PyTorch's ``Unflatten``: dimension ``dim`` (counting the batch as 0) becomes ``sizes``."""

    dim: int
    sizes: tuple[int, ...]
    torch_types: ClassVar[tuple] = ("Unflatten",)

    @classmethod
    def from_torch(cls, module, shape):
        return cls(module.dim % (len(shape) + 1), tuple(module.unflattened_size))

    def output_shape(self, shape):
        if not 1 <= self.dim <= len(shape) or _prod(self.sizes) != shape[self.dim - 1]:
            raise ChainError(f"Unflatten({self.dim}, {self.sizes}) cannot take per-example shape {tuple(shape)}")
        return tuple(shape[: self.dim - 1]) + self.sizes + tuple(shape[self.dim:])

    def to_torch(self):
        from torch import nn

        return nn.Unflatten(self.dim, self.sizes)


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


#: the built-in component types, the ones :mod:`smoothchain.torch_chain` registers for their
#: ``torch_types``
COMPONENT_TYPES: tuple[type, ...] = (
    Linear, Conv2d, ReLU, Softplus, Sigmoid, Tanh, Softmax, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
    BatchNorm, Flatten, Unflatten, Identity,
)


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


def layer_spans(components: Sequence[Component]) -> list[range]:
    """The components of each RH layer (Def. 2.1, eq. 7), as index ranges: a bi-affine component
    opens a layer and the ones after it, up to the next bi-affine one, join it; non-linear
    components before the first bi-affine one open a parameter-free layer (b = identity).
    Leading shape-only components belong to no layer."""
    for i, comp in enumerate(components):
        if comp.role not in ("bilinear", "nonlinear", "shape"):
            raise ChainError(f"component {comp.label!r} (number {i}) has unknown role {comp.role!r}")
    bil = [i for i, c in enumerate(components) if c.role == "bilinear"]
    first = next((i for i, c in enumerate(components) if c.role == "nonlinear"), None)
    starts = ([first] if first is not None and (not bil or first < bil[0]) else []) + bil
    return [range(a, b) for a, b in zip(starts, starts[1:] + [len(components)])]


def build_layers(
    components: Sequence[Component],
    shapes: Sequence[tuple[int, ...]],
    batch_size: int,
    mode: str,
    names: Sequence[str] | None = None,
    weight_norms: Sequence[float | None] | None = None,
    norms_at_weights: Sequence["WeightNorms | None"] | None = None,
) -> list[Layer]:
    """RH layers (Def. 2.1, eq. 7) with their constants, grouped by :func:`layer_spans`.

    ``shapes[i]`` is the input shape of ``components[i]``.  A parameter-free first layer has
    b = identity (l_beta^z = 1).  ``weight_norms[i]`` is the norm of the parameters of bi-affine
    component i (RH Cor. 4.5); ``norms_at_weights[i]`` its :class:`WeightNorms`, used in
    ``tight`` mode only (``paper`` keeps Cor. 4.5 as printed).
    """
    _check_mode(mode)
    if batch_size < 1:
        raise ChainError(f"batch size must be >= 1, got {batch_size}")
    layers: list[Layer] = []
    for span in layer_spans(components):
        current = None  # [bilinear, [nonlinear...], name, weight_norm, WeightNorms | None]
        for i in span:
            comp = components[i]
            role = comp.role
            name = names[i] if names is not None else comp.label
            if role == "shape":
                continue
            consts = comp.constants(shapes[i], batch_size, mode)
            if role == "bilinear":
                if not isinstance(consts, BilinearConstants):
                    raise ChainError(f"component {name!r} is bi-affine but its constants are {type(consts).__name__}")
                wn = weight_norms[i] if weight_norms is not None else None
                at = norms_at_weights[i] if norms_at_weights is not None and mode == "tight" else None
                current = [consts, [], name, wn, at]
                continue
            if not isinstance(consts, ComponentConstants):
                raise ChainError(f"component {name!r} is non-linear but its constants are {type(consts).__name__}")
            if current is None:
                current = [BilinearConstants(0.0, 0.0, 1.0, 0.0), [], "input", 0.0, None]
            if not consts.name:
                consts = ComponentConstants(
                    consts.bound, consts.lipschitz, consts.smoothness, consts.value_at_zero, consts.jacobian_at_zero, name
                )
            current[1].append(consts)
        layers.append(_layer(*current))
    if not layers:
        raise ChainError("the model has no layer with parameters or non-linear part to certify")
    return layers


def _layer(bilinear, nonlinear, name, weight_norm, at) -> Layer:
    return Layer(bilinear, tuple(nonlinear), name, weight_norm,
                 None if at is None else at.input_operator, None if at is None else at.offset)
