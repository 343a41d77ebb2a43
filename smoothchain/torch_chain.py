"""From PyTorch modules to chains of components (RH Def. 2.1), with a public registry.

:func:`components_from_module` walks an ``nn.Sequential`` (nested, with ``Flatten``) or a
VGG-style module (``features``, optional ``avgpool``, ``classifier``, like torchvision's
``vgg16()``), turns every leaf into components through :data:`REGISTRY`, and finds the shapes by
running each leaf on the ``meta`` device -- so VGG-16 at batch 128 and 224x224 allocates no real
memory.  An unsupported module raises :class:`UnsupportedModuleError` naming it and showing how
to register its constants with :func:`register_module`.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .chain import ChainError
from .components import COMPONENT_TYPES, ChannelAffine, Component, UnsupportedModuleError, WeightNorms
from .functional import batch_normalize, make_functional_call

__all__ = [
    "BatchStatisticsWarning",
    "warn_eval_batch_norms",
    "REGISTRY",
    "register_module",
    "register_component",
    "UnsupportedModuleError",
    "ModuleChain",
    "components_from_module",
    "leaf_modules",
    "ModuleLayer",
    "ModuleLayers",
    "module_layers",
    "convert",
    "resolve_torch_type",
    "torch_module",
]


Converter = Callable[[nn.Module, tuple], "Component | Sequence[Component]"]
#: module type -> converter; filled from the components' own ``torch_types`` (every built-in
#: component of :data:`smoothchain.components.COMPONENT_TYPES`) and by the two functions below
REGISTRY: dict[type, Converter] = {}


def register_module(module_type: type, converter: Converter) -> None:
    """Declare how a module type enters a chain.

    ``converter(module, input_shape)`` returns one :class:`~smoothchain.components.Component`
    or a list of them.  A new activation is simpler as one :class:`~smoothchain.components.Elementwise`
    class passed to :func:`register_component` (docs/registry.md); this is the general hook.
    Registering a type again replaces its converter; subclasses use their nearest registered base.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_module needs an nn.Module subclass, got {module_type!r}")
    REGISTRY[module_type] = converter


def resolve_torch_type(torch_type) -> type:
    """A ``torch_types`` entry as a type: a name in ``torch.nn``, a dotted path, or a type."""
    if isinstance(torch_type, type):
        return torch_type
    if "." not in torch_type:
        return getattr(nn, torch_type)
    module_name, _, attr = torch_type.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def register_component(component_type: type) -> type:
    """Register a :class:`~smoothchain.components.Component` subclass for each of its
    ``torch_types`` (converter: its ``from_torch``); returns the class, so it works as a decorator."""
    if not (isinstance(component_type, type) and issubclass(component_type, Component)):
        raise TypeError(f"register_component needs a Component subclass, got {component_type!r}")
    if not component_type.torch_types:
        raise TypeError(f"{component_type.__name__} declares no torch_types: nothing to register")
    for t in component_type.torch_types:
        register_module(resolve_torch_type(t), component_type.from_torch)
    return component_type


def _lookup(module: nn.Module) -> Converter | None:
    for klass in type(module).__mro__:
        if klass in REGISTRY:
            return REGISTRY[klass]
    return None


def convert(module: nn.Module, shape: tuple[int, ...]) -> list[Component] | None:
    """The components of one leaf module on per-example inputs ``shape`` (None if unregistered)."""
    converter = _lookup(module)
    if converter is None:
        return None
    converted = converter(module, tuple(shape))
    return [converted] if isinstance(converted, Component) else list(converted)


def _unsupported(name: str, module: nn.Module) -> UnsupportedModuleError:
    err = _unsupported_error(name, module)
    err.module_name = name  # "<root>" when the module itself is not a chain
    return err


def _unsupported_error(name: str, module: nn.Module) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"unsupported module {name!r} of type {type(module).__module__}.{type(module).__qualname__}: "
        "smoothchain needs the constants of every component. Register them with "
        "smoothchain.register_module(YourModule, lambda module, shape: smoothchain.Custom("
        "name='yours', kind='nonlinear', constants_fn=lambda shape, batch_size, mode: "
        "smoothchain.ComponentConstants(bound=..., lipschitz=..., smoothness=..., value_at_zero=..., "
        "jacobian_at_zero=...))), or, for an activation, one smoothchain.components.Elementwise class "
        "-- see docs/registry.md"
    )


def leaf_modules(module: nn.Module, prefix: str = "", *, strict: bool = True) -> list[tuple[str, nn.Module]]:
    """The chain's modules in application order, with qualified names: the one walk of a PyTorch
    model into RH's chain (Def. 2.1) that certify, check, the oracles and DSGD all use.

    Registered types are leaves; ``nn.Sequential`` is expanded; a VGG-style module expands to
    ``features``, ``avgpool`` (if any), a flatten, then ``classifier`` (torchvision's forward).
    Any other module raises :class:`UnsupportedModuleError` -- or, with ``strict=False`` (the
    oracles, which need only autodiff, not constants), is a leaf.
    """
    def sub(child: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
        return leaf_modules(child, f"{prefix}.{name}" if prefix else name, strict=strict)

    if _lookup(module) is not None:
        return [(prefix or type(module).__name__, module)]
    if isinstance(module, nn.Sequential):
        # not named_children(): it skips a module used twice, which the oracles must see (and refuse)
        return [leaf for name, child in zip(module._modules, module) for leaf in sub(child, name)]
    if hasattr(module, "features") and hasattr(module, "classifier"):
        out = sub(module.features, "features")
        if getattr(module, "avgpool", None) is not None:
            out.extend(sub(module.avgpool, "avgpool"))
        out.append((f"{prefix}.flatten" if prefix else "flatten", nn.Flatten()))
        out.extend(sub(module.classifier, "classifier"))
        return out
    if not strict:
        return [(prefix or type(module).__name__, module)]
    raise _unsupported(prefix or "<root>", module)


@dataclass(frozen=True)
class ModuleLayer:
    """One RH layer phi_l(v_l, z_{l-1}) (Def. 2.1) at the level of modules: the leaf owning v_l
    first, then the parameter-free leaves that follow it.

    ``modules`` are (qualified name, module) pairs of :func:`leaf_modules`, ``positions`` their
    indices among its leaves, ``params`` the first module's (name, parameter) pairs in
    ``named_parameters`` order, so that v_l is their flat concatenation.
    """

    modules: tuple[tuple[str, nn.Module], ...]
    positions: tuple[int, ...]
    params: tuple[tuple[str, nn.Parameter], ...]

    @property
    def owner(self) -> nn.Module:
        return self.modules[0][1]


@dataclass(frozen=True)
class ModuleLayers:
    """A chain-like module as ``pre`` (parameter-free leaves before the first layer: z_0 = pre(x))
    and its :class:`ModuleLayer` s; (v_1; ...; v_tau) is ``model.parameters()`` flattened."""

    pre: tuple[tuple[str, nn.Module], ...]
    layers: tuple[ModuleLayer, ...]


def module_layers(model: nn.Module) -> ModuleLayers:
    """The one grouping of :func:`leaf_modules` (``strict=False``) into RH layers by parameter
    ownership: a leaf owning parameters opens a layer, the parameter-free leaves after it join it.

    This is the module-level view of the chain that the oracles (functional calls per layer) and
    DSGD (F's Linear + activation layers) work on; :func:`components_from_module` is the
    component-level view (a batch norm's normalisation and affine part are two components of one
    leaf, so a layer of components may end inside a module).  Raises ``ValueError`` when a module
    is used twice or parameters are shared: the parameters are then no chain of layers.
    """
    pre: list[tuple[str, nn.Module]] = []
    groups: list[tuple[list, list]] = []  # (modules, positions)
    for pos, (name, mod) in enumerate(leaf_modules(model, strict=False)):
        if any(True for _ in mod.parameters()):
            groups.append(([(name, mod)], [pos]))
        elif groups:
            groups[-1][0].append((name, mod))
            groups[-1][1].append(pos)
        else:
            pre.append((name, mod))
    layers = tuple(ModuleLayer(tuple(mods), tuple(pos), tuple(mods[0][1].named_parameters()))
                   for mods, pos in groups)
    flat = [p for layer in layers for _, p in layer.params]
    model_params = list(model.parameters())
    if len(flat) != len(model_params) or any(a is not b for a, b in zip(flat, model_params)):
        raise ValueError("a module is used twice or parameters are shared: not a chain of layers")
    return ModuleLayers(tuple(pre), layers)


class BatchStatisticsWarning(UserWarning):
    """A batch norm in evaluation mode is certified with the batch's own statistics."""


def warn_eval_batch_norms(leaves: Sequence[tuple[str, nn.Module]], stacklevel: int = 3) -> None:
    """Say once, naming them, that batch norms in evaluation mode are certified (and estimated)
    with the batch's statistics, as in RH eq. (11), not with their running statistics."""
    names = [name for name, m in leaves if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training]
    if names:
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(f"batch norm {shown} in evaluation mode: certified with the batch's own statistics "
                      "(RH eq. 11), not its running statistics; the certificate is for training-mode "
                      "normalisation (model.train() before certifying silences this)", BatchStatisticsWarning,
                      stacklevel=stacklevel)


@dataclass(frozen=True)
class ModuleChain:
    """Components of a module with display names, per-example shapes and weight norms.

    ``shapes[i]`` is the input shape of ``components[i]`` (``shapes[-1]`` the output), found on
    the meta device; ``weight_norms[i]`` is ||v*|| of bi-affine component i (else None);
    ``leaves`` the (name, module) pairs of :func:`leaf_modules` and ``leaf_index[i]`` the leaf
    that component i comes from (a batch norm gives two components of one leaf);
    ``norms_at_weights[i]`` the exact norms of bi-affine component i at its weights
    (:meth:`~smoothchain.components.Component.weight_norms_at`), with ``weight_norms``.
    """

    components: tuple[Component, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    weight_norms: tuple[float | None, ...]
    leaves: tuple[tuple[str, nn.Module], ...] = ()
    leaf_index: tuple[int, ...] = ()
    norms_at_weights: tuple[WeightNorms | None, ...] = ()


def _meta_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module on a meta-device batch (shapes only, no memory): batch statistics as in RH
    eq. (11), no running-statistics update."""
    call = make_functional_call(module, pure=True, batch_statistics=True)
    params = {n: torch.empty_like(t, device="meta") for n, t in call.module.named_parameters()}
    buffers = {n: torch.empty_like(t, device="meta") for n, t in call.module.named_buffers()}
    return call(params, x, buffers=buffers)


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
    at_weights: list[WeightNorms | None] = []
    index: list[int] = []
    leaves = leaf_modules(module)
    for li, (name, leaf) in enumerate(leaves):
        parts = convert(leaf, shape)
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
            index.append(li)
            names.append(part_name)
            shapes.append(shape)
            bilinear = weight_norms and part.role == "bilinear"
            norms.append(_weight_norm(leaf, part) if bilinear else None)
            at_weights.append(_norms_at_weights(leaf, part, shape, batch_size) if bilinear else None)
            shape = tuple(part.output_shape(shape))
        if shape != out_shape:
            raise ChainError(
                f"module {name!r}: its declared components give shape {shape} but PyTorch gives {out_shape}; "
                "check the registered converter"
            )
    shapes.append(shape)
    return ModuleChain(tuple(comps), tuple(names), tuple(shapes), tuple(norms), tuple(leaves), tuple(index),
                       tuple(at_weights))


def _norms_at_weights(leaf: nn.Module, part: Component, shape: tuple[int, ...], batch_size: int):
    """The component's own norms at the leaf's actual parameters (after :func:`_weight_norm` has
    checked them: real and finite)."""
    return part.weight_norms_at(getattr(leaf, "weight", None), getattr(leaf, "bias", None), shape, batch_size)


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
    mods = [c.to_torch() for c in components]
    if names is None:
        return nn.Sequential(*mods)
    return nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in zip(names, mods)))


class EntryBatchNorm(nn.Module):
    """RH eq. (11): each entry of an example normalised across the batch, no affine part."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_normalize(x, [0], self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


for _component in COMPONENT_TYPES:
    register_component(_component)
