"""Certificates for models: chain constants (RH Prop. 4.4 / Cor. 4.5) and objective (Prop. 4.2, Thm 4.1).

:func:`build_chain` turns a model -- a built-in name, a component list, an ``nn.Module`` or a
:class:`~smoothchain.chain.Chain` -- into a chain of constants; :func:`certify` runs the
recursions and returns a frozen :class:`Certificate`.  PyTorch is imported only for modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .chain import Chain, ChainError
from .components import Component, UnsupportedModuleError, build_layers, propagate_shapes
from .models import BuiltinModel, builtin
from .objective import LossConstants, ObjectiveBounds, loss_constants, objective_bounds
from .recursion import ChainBounds, chain_bounds, graph_bounds
from .spec import json_number

__all__ = ["Certificate", "certify", "certify_chain", "certify_source", "build_chain", "parse_input_shape",
           "seeded_module"]


@dataclass(frozen=True)
class Certificate:
    """A certificate: the chain's table and bounds, the objective's smoothness and rates."""

    chain: Chain
    bounds: ChainBounds
    objective: ObjectiveBounds
    mode: str
    loss: str
    batch_size: int | None = None
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document of DESIGN.md (infinite values as the string "inf")."""
        o = self.objective
        return {
            "layers": [
                {
                    "index": r.index,
                    "name": r.name,
                    "output_bound": json_number(r.output_bound),
                    "lipschitz": json_number(r.lipschitz),
                    "smoothness": json_number(r.smoothness),
                }
                for r in self.bounds.layers
            ],
            "chain": {
                "output_bound": json_number(self.bounds.output_bound),
                "lipschitz": json_number(self.bounds.lipschitz),
                "smoothness": json_number(self.bounds.smoothness),
            },
            "objective": {
                "loss_lipschitz": json_number(o.loss_lipschitz),
                "loss_smoothness": json_number(o.loss_smoothness),
                "smoothness": json_number(o.smoothness),
                "step_size": json_number(o.step_size),
                "iterations": json_number(o.iterations),
            },
            "settings": {
                "model": self.model,
                "constants": self.mode,
                "loss": self.loss,
                "batch_size": self.batch_size,
                "radius": json_number(self.chain.radius),
                "input_norm": json_number(self.chain.input_norm),
                "centre": self.chain.centre,
                "l2": json_number(o.regularization_smoothness),
                "epsilon": json_number(o.epsilon),
                "gap": json_number(o.gap),
            },
        }


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"3,224,224"`` or ``"64"`` -> a per-example shape tuple."""
    if not isinstance(text, str):
        return tuple(int(s) for s in text)
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ChainError(f"--input-shape must look like C,H,W or D, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ChainError(f"--input-shape must be positive integers like C,H,W or D, got {text!r}")
    return shape


def build_chain(
    model: Any,
    *,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    mode: str = "paper",
    radius: float = 1.0,
    input_norm: float = 1.0,
    around_weights: bool = False,
    bn_eps: float = 1e-5,
) -> Chain:
    """The chain of constants of ``model`` (RH Def. 2.1 with App. B constants).

    ``model``: a built-in name (see :mod:`smoothchain.models`), a :class:`BuiltinModel`, a list
    of components, an ``nn.Module`` (chain-like), or a :class:`Chain` (returned with the given
    radius/input norm).  ``around_weights`` centres the balls at the module's current weights
    (RH Cor. 4.5); it needs an ``nn.Module``.
    """
    if radius is None or not isinstance(radius, (int, float)) or math.isnan(radius) or radius < 0:
        raise ChainError(f"--radius must be >= 0, got {radius}")
    if batch_size < 1:
        raise ChainError(f"--batch-size must be >= 1, got {batch_size}")
    if isinstance(model, Chain):
        chain = model.with_options(radius=radius, input_norm=input_norm)
        return chain.around_weights() if around_weights else chain
    if isinstance(model, str):
        model = builtin(model, bn_eps=bn_eps)
    names = None
    weight_norms = norms_at_weights = None
    if isinstance(model, BuiltinModel):
        if around_weights:
            from .torch_chain import torch_module

            return build_chain(
                torch_module(model.components, model.names), input_shape=input_shape or model.input_shape,
                batch_size=batch_size, mode=mode, radius=radius, input_norm=input_norm, around_weights=True,
            )
        components, names = list(model.components), list(model.names)
        shapes = propagate_shapes(components, input_shape or model.input_shape)
    elif isinstance(model, (list, tuple)) and all(isinstance(c, Component) for c in model):
        if input_shape is None:
            raise ChainError("a component list needs input_shape")
        components = list(model)
        shapes = propagate_shapes(components, input_shape)
    else:
        from torch import nn

        if not isinstance(model, nn.Module):
            raise ChainError(f"cannot certify {type(model).__name__}: give a model name, components, an nn.Module or a Chain")
        if input_shape is None:
            input_shape = getattr(model, "input_shape", None)
            if input_shape is None:
                raise ChainError("an nn.Module needs --input-shape (per example, e.g. 3,32,32 or 784)")
        from .torch_chain import components_from_module, warn_eval_batch_norms

        mc = components_from_module(model, input_shape, batch_size, weight_norms=around_weights)
        warn_eval_batch_norms(mc.leaves, stacklevel=4)
        components, names, shapes = list(mc.components), list(mc.names), list(mc.shapes)
        if around_weights:
            weight_norms, norms_at_weights = list(mc.weight_norms), list(mc.norms_at_weights)
    layers = build_layers(components, shapes, batch_size, mode, names, weight_norms, norms_at_weights)
    chain = Chain(tuple(layers), input_norm=input_norm, radius=radius)
    return chain.around_weights() if around_weights else chain


def certify_chain(chain: Chain, loss: LossConstants, *, l2: float = 0.0, epsilon: float = 1e-2,
                  gap: float | None = None, mode: str = "paper", loss_name: str = "", batch_size: int | None = None,
                  model: str = "", bounds: ChainBounds | None = None) -> Certificate:
    """Run RH Prop. 4.4 (or Cor. 4.5) on ``chain``, then Prop. 4.2 and Thm 4.1 with ``loss``.

    ``bounds``, if given, must be ``chain_bounds(chain)`` (saves recomputing it).
    """
    if bounds is None:
        bounds = chain_bounds(chain)
    norms = None
    if chain.centre == "weights":
        norms = tuple(layer.weight_norm or 0.0 for layer in chain.layers)
    objective = objective_bounds(bounds, loss, l2=l2, epsilon=epsilon, gap=gap, weight_norms=norms)
    return Certificate(chain, bounds, objective, mode, loss_name or loss.name, batch_size, model)


def certify(
    model: Any,
    *,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    radius: float = 1.0,
    input_norm: float = 1.0,
    loss: str = "cross-entropy",
    mode: str = "paper",
    l2: float = 0.0,
    epsilon: float = 1e-2,
    around_weights: bool = False,
    target_norm: float = 1.0,
    gap: float | None = None,
    bn_eps: float = 1e-5,
) -> Certificate:
    """Certify ``model`` on C = {||v_l - v*_l|| <= R} (v* = 0, or the weights if ``around_weights``).

    Example::

        >>> from smoothchain import certify
        >>> cert = certify("vgg16-smooth", batch_size=128, radius=1.0, input_norm=1.0)
        >>> cert.bounds.lipschitz > 0
        True
    """
    try:
        chain = build_chain(
            model, input_shape=input_shape, batch_size=batch_size, mode=mode, radius=radius,
            input_norm=input_norm, around_weights=around_weights, bn_eps=bn_eps,
        )
        bounds = chain_bounds(chain)
    except UnsupportedModuleError as not_a_chain:
        # a module with skip connections: its torch.fx graph (docs/graphs.md); an unregistered
        # leaf module fails there with the same message
        chain = _module_graph(model, not_a_chain, input_shape=input_shape, batch_size=batch_size, mode=mode,
                              radius=radius, input_norm=input_norm, around_weights=around_weights)
        bounds = graph_bounds(chain)
    loss_c = loss_constants(
        loss, batch_size=batch_size, output_bound=bounds.output_bound, mode=mode, target_norm=target_norm, input_norm=input_norm
    )
    name = model if isinstance(model, str) else getattr(model, "name", type(model).__name__)
    return certify_chain(
        chain, loss_c, l2=l2, epsilon=epsilon, gap=gap, mode=mode, loss_name=loss, batch_size=batch_size, model=str(name),
        bounds=bounds,
    )


def _module_graph(model: Any, not_a_chain: Exception, *, input_shape, batch_size: int, mode: str, radius: float,
                  input_norm: float, around_weights: bool):
    """The graph of an ``nn.Module`` that is not a chain (RH Def. 2.1 with merges, issue 13)."""
    if type(model).__module__.split(".")[0] == "smoothchain" or not hasattr(model, "named_modules"):
        raise not_a_chain
    from .torch_chain import warn_eval_batch_norms
    from .torch_graph import graph_from_module

    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ChainError("an nn.Module needs --input-shape (per example, e.g. 3,32,32 or 784)")
    for pname, p in model.named_parameters():
        if not p.is_meta and not bool(p.detach().isfinite().all()):
            raise ChainError(f"parameter {pname!r} has NaN or infinite entries; fix or re-initialise the model")
    warn_eval_batch_norms(list(model.named_modules()), stacklevel=5)
    try:
        graph = graph_from_module(model, input_shape, batch_size, mode=mode, radius=radius, input_norm=input_norm,
                                  weight_norms=around_weights).graph
    except UnsupportedModuleError:
        raise
    except ChainError:
        if getattr(not_a_chain, "module_name", "<root>") != "<root>":
            # the chain reader found one unregistered module inside: the clearer error, and the
            # trace went wrong because of it (it traced into that module's forward)
            raise not_a_chain from None
        raise
    return graph.around_weights() if around_weights else graph


def seeded_module(model: Any, *, seed: int = 0, bn_eps: float = 1e-5):
    """The ``nn.Sequential`` of a built-in model (a name or :class:`BuiltinModel`) or of a
    component list, with PyTorch's default initialisation drawn from
    ``torch.Generator().manual_seed(seed)``.

    The weights are those that seeding PyTorch's global generator with ``seed`` and then
    constructing the module gives (the same draws in the same order), but the global random
    state is left alone.
    """
    import torch
    from torch import nn

    from .torch_chain import torch_module

    if isinstance(model, str):
        model = builtin(model, bn_eps=bn_eps)
    components, names = (model.components, model.names) if isinstance(model, BuiltinModel) else (list(model), None)
    with torch.device("meta"):  # no draws from the global generator
        module = torch_module(components, names)
    module = module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd)):  # their reset_parameters()
                nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5), generator=gen)
                if sub.bias is not None:
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(sub.weight)
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    nn.init.uniform_(sub.bias, -bound, bound, generator=gen)
            elif next(sub.parameters(recurse=False), None) is not None or next(sub.buffers(recurse=False), None) is not None:
                raise ChainError(f"no seeded initialisation for {type(sub).__name__}")
    return module


def certify_source(
    model: Any = None,
    *,
    spec: Any = None,
    name: str | None = None,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    batch_size: int = 1,
    radius: float | None = None,
    input_norm: float | None = None,
    loss: str = "cross-entropy",
    mode: str = "paper",
    l2: float | None = None,
    epsilon: float = 1e-2,
    gap: float | None = None,
    target_norm: float = 1.0,
    around_weights: bool = False,
    bn_eps: float = 1e-5,
) -> Certificate:
    """Certify a model or a spec, as ``smoothchain certify --model/--module/--spec`` does.

    Exactly one of ``model`` (anything :func:`certify` takes) and ``spec`` (a spec file or a
    loaded :class:`~smoothchain.spec.Spec`, DESIGN.md).  ``None`` for ``radius``,
    ``input_norm`` and ``l2`` means the spec's values, or 1, 1 and 0 for a model.  A spec fixes
    the loss constants: ``batch_size``, ``loss``, ``mode``, ``input_shape`` and ``target_norm``
    are ignored and the certificate's mode is ``"spec"``.  A built-in model with
    ``around_weights`` gets the weights of :func:`seeded_module` (``seed``).  ``input_shape``
    may be text (:func:`parse_input_shape`).  ``name`` is the certificate's model name
    (default: the built-in's name, the spec's path, or as :func:`certify`).  PyTorch is
    imported only for modules and ``around_weights``.
    """
    from dataclasses import replace

    from .spec import Spec, load_spec

    if (model is None) == (spec is None):
        raise ChainError("certify_source needs exactly one of a model and a spec")
    if spec is not None:
        s = spec if isinstance(spec, Spec) else load_spec(spec)
        chain = build_chain(s.chain, radius=s.chain.radius if radius is None else radius,
                            input_norm=s.chain.input_norm if input_norm is None else input_norm,
                            around_weights=around_weights)
        return certify_chain(chain, s.loss, l2=s.regularization_smoothness if l2 is None else l2, epsilon=epsilon,
                             gap=gap, mode="spec", loss_name="spec", model=str(spec) if name is None else name)
    input_shape = parse_input_shape(input_shape) if input_shape else None
    if isinstance(model, str):
        name = model if name is None else name
        model = builtin(model, bn_eps=bn_eps)
    if around_weights and isinstance(model, BuiltinModel):
        input_shape = input_shape or model.input_shape
        model = seeded_module(model, seed=seed)
    cert = certify(model, input_shape=input_shape, batch_size=batch_size, radius=1.0 if radius is None else radius,
                   input_norm=1.0 if input_norm is None else input_norm, loss=loss, mode=mode, l2=l2 or 0.0,
                   epsilon=epsilon, around_weights=around_weights, target_norm=target_norm, gap=gap, bn_eps=bn_eps)
    return cert if name is None else replace(cert, model=str(name))
