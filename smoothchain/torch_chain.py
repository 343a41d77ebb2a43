"""From PyTorch modules to chains of components (RH Def. 2.1), with a public registry.

:func:`components_from_module` walks an ``nn.Sequential`` (nested, with ``Flatten``) or a
VGG-style module (``features``, optional ``avgpool``, ``classifier``, like torchvision's
``vgg16()``), turns every leaf into components through :data:`REGISTRY`, and finds the shapes by
running each leaf on the ``meta`` device -- so VGG-16 at batch 128 and 224x224 allocates no real
memory.  An unsupported module raises :class:`UnsupportedModuleError` naming it and showing how
to register its constants with :func:`register_module`.
"""

from __future__ import annotations

from collections import OrderedDict

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .chain import ChainError
from .components import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm,
    ChannelAffine,
    Component,
    Conv2d,
    Custom,
    Flatten,
    Identity,
    Linear,
    MaxPool2d,
    ReLU,
    Sigmoid,
    Softmax,
    Softplus,
    Tanh,
)

__all__ = [
    "REGISTRY",
    "register_module",
    "sequential_leaves",
    "UnsupportedModuleError",
    "ModuleChain",
    "components_from_module",
    "leaf_modules",
    "torch_module",
]


class UnsupportedModuleError(ChainError):
    """A module type with no registered constants."""


Converter = Callable[[nn.Module, tuple], "Component | Sequence[Component]"]
REGISTRY: dict[type, Converter] = {}


def register_module(module_type: type, converter: Converter) -> None:
    """Declare how a module type enters a chain.

    ``converter(module, input_shape)`` returns one :class:`~smoothchain.components.Component`
    or a list of them, e.g. for an activation x -> x / (1 + |x|)::

        from smoothchain import ComponentConstants, Custom, register_module
        register_module(Softsign, lambda mod, shape: Custom(
            name="softsign", kind="nonlinear",
            constants_fn=lambda shape, m, mode: ComponentConstants(
                bound=math.sqrt(m * math.prod(shape)), lipschitz=1.0, smoothness=2.0,
                value_at_zero=0.0, jacobian_at_zero=1.0)))

    Registering a type again replaces its converter; subclasses use their nearest registered base.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_module needs an nn.Module subclass, got {module_type!r}")
    REGISTRY[module_type] = converter


def _conv_padding(mod: nn.Conv2d) -> tuple[int, int]:
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(mod.kernel_size, mod.dilation):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedModuleError(f"{mod} uses padding='same' with an even kernel: asymmetric padding is not supported")
            pads.append(total // 2)
        return tuple(pads)  # type: ignore[return-value]
    return tuple(mod.padding)  # type: ignore[return-value]


def _convert_conv(mod: nn.Conv2d, shape) -> Component:
    if mod.groups != 1:
        raise UnsupportedModuleError(f"{mod}: grouped convolutions (groups={mod.groups}) are not supported; register a converter")
    if mod.padding_mode != "zeros":
        raise UnsupportedModuleError(f"{mod}: padding_mode={mod.padding_mode!r} is not supported, only 'zeros'")
    return Conv2d(
        mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride), _conv_padding(mod),
        tuple(mod.dilation), mod.bias is not None,
    )


def _convert_pool(mod, shape) -> Component:
    if getattr(mod, "dilation", 1) not in (1, (1, 1)):
        raise UnsupportedModuleError(f"{mod}: dilated pooling is not supported")
    if isinstance(mod, nn.AvgPool2d):
        if not mod.count_include_pad and mod.padding not in (0, (0, 0)):
            raise UnsupportedModuleError(f"{mod}: count_include_pad=False with padding is not supported")
        if mod.divisor_override is not None:
            raise UnsupportedModuleError(f"{mod}: divisor_override is not supported")
        return AvgPool2d(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)
    return MaxPool2d(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)


def _convert_softmax(mod: nn.Softmax, shape) -> Component:
    ndim = len(shape) + 1
    if mod.dim is None or mod.dim % ndim != ndim - 1:
        raise UnsupportedModuleError(f"{mod}: softmax must act on the last dimension (dim=-1 or {ndim - 1})")
    return Softmax()


def _convert_batchnorm(mod: nn.modules.batchnorm._BatchNorm, shape) -> list[Component]:
    over = "entry" if len(shape) == 1 else "channel"
    out: list[Component] = [BatchNorm(mod.eps, over=over)]
    if mod.affine:
        out.append(ChannelAffine(mod.num_features, bias=True))
    return out


def _convert_adaptive(mod: nn.AdaptiveAvgPool2d, shape) -> Component:
    size = mod.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    size = tuple(shape[1 + i] if s is None else s for i, s in enumerate(size))
    return AdaptiveAvgPool2d(size)


def _convert_flatten(mod: nn.Flatten, shape) -> Component:
    if mod.start_dim == 0:
        raise UnsupportedModuleError(f"{mod}: flattening the batch dimension mixes examples")
    return Flatten(mod.start_dim, mod.end_dim)


def _convert_unflatten(mod: nn.Unflatten, shape) -> Component:
    dim = mod.dim % (len(shape) + 1)
    new = tuple(shape[: dim - 1]) + tuple(mod.unflattened_size) + tuple(shape[dim:])
    return Custom(name="unflatten", kind="shape", constants_fn=None, shape_fn=lambda s, new=new: new)


for _t, _f in {
    nn.Linear: lambda m, s: Linear(m.in_features, m.out_features, m.bias is not None),
    nn.Conv2d: _convert_conv,
    nn.ReLU: lambda m, s: ReLU(),
    nn.Softplus: lambda m, s: Softplus(float(m.beta)),
    nn.Sigmoid: lambda m, s: Sigmoid(),
    nn.Tanh: lambda m, s: Tanh(),
    nn.Softmax: _convert_softmax,
    nn.MaxPool2d: _convert_pool,
    nn.AvgPool2d: _convert_pool,
    nn.AdaptiveAvgPool2d: _convert_adaptive,
    nn.BatchNorm1d: _convert_batchnorm,
    nn.BatchNorm2d: _convert_batchnorm,
    nn.Flatten: _convert_flatten,
    nn.Unflatten: _convert_unflatten,
    nn.Identity: lambda m, s: Identity(),
    nn.Dropout: lambda m, s: Identity(),  # certified at evaluation (p has no effect); see docs
}.items():
    REGISTRY[_t] = _f


def _lookup(module: nn.Module) -> Converter | None:
    for klass in type(module).__mro__:
        if klass in REGISTRY:
            return REGISTRY[klass]
    return None


def sequential_leaves(module: nn.Module):
    """The modules of a (nested) ``nn.Sequential`` in application order, nested Sequentials
    expanded; any other module is a leaf (the chains of the oracles and of DSGD)."""
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from sequential_leaves(child)
    else:
        yield module


def leaf_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The chain's modules in application order, with qualified names.

    Registered types are leaves; ``nn.Sequential`` is expanded; a VGG-style module expands to
    ``features``, ``avgpool`` (if any), a flatten, then ``classifier`` (torchvision's forward).
    """
    if _lookup(module) is not None:
        return [(prefix or type(module).__name__, module)]
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out.extend(leaf_modules(child, f"{prefix}.{name}" if prefix else name))
        return out
    if hasattr(module, "features") and hasattr(module, "classifier"):
        out = leaf_modules(module.features, f"{prefix}.features" if prefix else "features")
        if getattr(module, "avgpool", None) is not None:
            out.extend(leaf_modules(module.avgpool, f"{prefix}.avgpool" if prefix else "avgpool"))
        out.append((f"{prefix}.flatten" if prefix else "flatten", nn.Flatten()))
        out.extend(leaf_modules(module.classifier, f"{prefix}.classifier" if prefix else "classifier"))
        return out
    name = prefix or "<root>"
    raise UnsupportedModuleError(
        f"unsupported module {name!r} of type {type(module).__module__}.{type(module).__qualname__}: "
        "smoothchain needs the constants of every component. Register them with "
        "smoothchain.register_module(YourModule, lambda module, shape: smoothchain.Custom("
        "name='yours', kind='nonlinear', constants_fn=lambda shape, batch_size, mode: "
        "smoothchain.ComponentConstants(bound=..., lipschitz=..., smoothness=..., value_at_zero=..., "
        "jacobian_at_zero=...))) -- see docs/registry.md"
    )


@dataclass(frozen=True)
class ModuleChain:
    """Components of a module with display names, per-example shapes and weight norms.

    ``shapes[i]`` is the input shape of ``components[i]`` (``shapes[-1]`` the output), found on
    the meta device; ``weight_norms[i]`` is ||v*|| of bi-affine component i (else None).
    """

    components: tuple[Component, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    weight_norms: tuple[float | None, ...]


def _meta_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tensors = {n: torch.empty_like(t, device="meta") for n, t in module.named_parameters()}
    tensors.update({n: torch.empty_like(t, device="meta") for n, t in module.named_buffers()})
    was_training = module.training
    module.train()  # batch statistics, as in RH eq. (11); no running-stat update on meta tensors
    try:
        return functional_call(module, tensors, (x,))
    finally:
        module.train(was_training)


def components_from_module(
    module: nn.Module, input_shape: Sequence[int], batch_size: int = 2, *, weight_norms: bool = False
) -> ModuleChain:
    """Components, shapes (meta device) and, if ``weight_norms``, the weight norms of a chain-like module.

    Weight norms need real weights; without them the module may live on the meta device.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ChainError(f"input shape must be positive integers, got {tuple(input_shape)}")
    for pname, p in module.named_parameters():
        if not p.is_meta and not bool(torch.isfinite(p.detach()).all()):
            raise ChainError(f"parameter {pname!r} has NaN or infinite entries; fix or re-initialise the model")
    comps: list[Component] = []
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    norms: list[float | None] = []
    for name, leaf in leaf_modules(module):
        converted = _lookup(leaf)(leaf, shape)  # type: ignore[misc]
        parts = [converted] if isinstance(converted, Component) else list(converted)
        # the leaf's true output shape, by PyTorch itself on the meta device
        dtype = next((t.dtype for t in leaf.parameters() if t.is_floating_point()), torch.get_default_dtype())
        x = torch.empty((max(batch_size, 2),) + shape, device="meta", dtype=dtype)
        try:
            y = _meta_forward(leaf, x)
        except Exception as err:  # shape mismatch, wrong rank, ...
            raise ChainError(
                f"module {name!r} ({type(leaf).__name__}) cannot take per-example input shape {shape}: "
                f"{str(err).splitlines()[0]} -- check --input-shape"
            ) from None
        out_shape = tuple(y.shape[1:])
        for k, part in enumerate(parts):
            part_name = name if len(parts) == 1 else f"{name}.{'norm' if k == 0 else 'affine'}"
            comps.append(part)
            names.append(part_name)
            shapes.append(shape)
            norms.append(_weight_norm(leaf, part) if weight_norms and part.role == "bilinear" else None)
            shape = tuple(part.output_shape(shape))
        if shape != out_shape:
            raise ChainError(
                f"module {name!r}: its declared components give shape {shape} but PyTorch gives {out_shape}; "
                "check the registered converter"
            )
    shapes.append(shape)
    return ModuleChain(tuple(comps), tuple(names), tuple(shapes), tuple(norms))


def _weight_norm(leaf: nn.Module, part: Component) -> float:
    if isinstance(part, ChannelAffine):
        params: Iterable[tuple[str, torch.Tensor]] = [("weight", leaf.weight), ("bias", leaf.bias)]
    else:
        params = list(leaf.named_parameters(recurse=False))
    total = 0.0
    for pname, p in params:
        if p is None:
            continue
        if p.is_meta:
            raise ChainError("weights are on the meta device: --around-weights needs real weights")
        p = p.detach()
        if not torch.isfinite(p).all():
            raise ChainError(f"parameter {pname!r} of {type(leaf).__name__} has NaN or infinite entries")
        total += float(p.double().pow(2).sum())
    return math.sqrt(total)


def torch_module(components: Sequence[Component], names: Sequence[str] | None = None) -> nn.Sequential:
    """An ``nn.Sequential`` implementing a component list (built-in models, tests).

    ``names`` (one per component, e.g. a built-in model's ``conv1``, ``conv1.act``) name the
    submodules, with "." replaced by "_" as PyTorch requires; default: 0, 1, 2, ...
    """
    if names is not None and len(names) != len(components):
        raise ChainError(f"got {len(names)} names for {len(components)} components")
    mods: list[nn.Module] = []
    for c in components:
        if isinstance(c, Linear):
            mods.append(nn.Linear(c.in_features, c.out_features, bias=c.bias))
        elif isinstance(c, Conv2d):
            mods.append(nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, bias=c.bias))
        elif isinstance(c, ReLU):
            mods.append(nn.ReLU())
        elif isinstance(c, Softplus):
            mods.append(nn.Softplus(beta=c.beta, threshold=math.inf))
        elif isinstance(c, Sigmoid):
            mods.append(nn.Sigmoid())
        elif isinstance(c, Tanh):
            mods.append(nn.Tanh())
        elif isinstance(c, Softmax):
            mods.append(nn.Softmax(dim=-1))
        elif isinstance(c, MaxPool2d):
            mods.append(nn.MaxPool2d(c.kernel_size, c.stride, c.padding, ceil_mode=c.ceil_mode))
        elif isinstance(c, AvgPool2d):
            mods.append(nn.AvgPool2d(c.kernel_size, c.stride, c.padding, ceil_mode=c.ceil_mode))
        elif isinstance(c, AdaptiveAvgPool2d):
            mods.append(nn.AdaptiveAvgPool2d(c.output_size))
        elif isinstance(c, BatchNorm):
            if c.over != "entry":
                raise ChainError("only per-entry batch norm has a built-in module (EntryBatchNorm)")
            mods.append(EntryBatchNorm(c.eps))
        elif isinstance(c, Flatten):
            mods.append(nn.Flatten(c.start_dim, c.end_dim))
        elif isinstance(c, Identity):
            mods.append(nn.Identity())
        else:
            raise ChainError(f"no PyTorch module for component {c!r}")
    if names is None:
        return nn.Sequential(*mods)
    return nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in zip(names, mods)))


class EntryBatchNorm(nn.Module):
    """RH eq. (11): each entry of an example normalised across the batch, no affine part."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=0, keepdim=True)
        var = (x - mean).pow(2).mean(dim=0, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


REGISTRY[EntryBatchNorm] = lambda m, s: BatchNorm(m.eps, over="entry")
