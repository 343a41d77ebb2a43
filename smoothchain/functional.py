"""A module as a pure function of its parameters: the one ``torch.func.functional_call`` adapter.

Every part of smoothchain that differentiates a network with respect to its weights -- the
estimators of RH (long version) Fact A.3 (:mod:`.estimators`), the autodiff oracle of RH
Def. 3.2 / Algo. 3 (:mod:`.oracles.autodiff`), the dense references of RH App. C.2
(:mod:`.oracles.dense`), the layers phi_l(v_l, z_{l-1}) of the dynamic programming of RH
Prop. C.1 (:mod:`.oracles.lq`) and the cost counts of RH Fact C.4 (:mod:`.complexity`) -- calls
the module through :func:`make_functional_call`, in the manner of curvlinops'
``make_functional_call``: one flattening convention, one set of checks, one place that decides
how batch norm and dropout behave inside the function.

Flat-vector convention: the parameters in ``module.named_parameters()`` order (tied parameters
once, frozen ones included), each flattened in row-major order and concatenated -- the vector
w = (v_1; ...; v_tau) of RH, see :func:`flat_parameters`.

Two ways to call a module (the option ``pure`` of :func:`make_functional_call`):

* ``pure=False`` (the oracles): the module itself, as it is -- every submodule in its own mode,
  batch norm by PyTorch's kernel (in training mode it normalises with the batch statistics and
  updates the running statistics, exactly as ``module(x)`` does), dropout as its mode says.
* ``pure=True`` (the estimators): a copy of the module that shares its parameter tensors (they
  are replaced in every call, never written) and owns copies of its buffers (so later changes to
  the module do not affect the function, and the function never writes to the module).  In the
  copy dropout is in eval mode (the identity), so the function is deterministic, and every batch
  norm that normalises with the batch statistics (RH eq. 11) is replaced by
  :class:`_TrainModeBatchNorm`, the same computation in elementary ops that tracks no running
  statistics; the others use their running statistics, read only.  ``batch_statistics`` chooses
  which batch norms normalise with the batch statistics (see :func:`make_functional_call`).
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["Params", "FunctionalModule", "flat_parameters", "make_functional_call", "batch_normalize"]

#: the parameters of a call: one flat vector, a sequence of tensors in ``named_parameters()``
#: order, or a mapping from parameter names to tensors
Params = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def flat_parameters(module: nn.Module) -> Tensor:
    """The module's parameters as one detached flat vector (``named_parameters()`` order)."""
    return torch.cat([p.detach().reshape(-1) for _, p in module.named_parameters()]).clone()


def batch_normalize(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    """RH eq. (11): (x - mean) / sqrt(var + eps) with the mean and the biased variance taken over
    ``dims`` (the batch, and the positions for a per-channel norm), in elementary ops -- the one
    batch-norm forward of smoothchain (``EntryBatchNorm`` and :class:`_TrainModeBatchNorm`)."""
    mean = x.mean(dim=tuple(dims), keepdim=True)
    var = (x - mean).pow(2).mean(dim=tuple(dims), keepdim=True)  # biased, as batch norm normalises
    return (x - mean) / torch.sqrt(var + eps)


class _TrainModeBatchNorm(nn.Module):
    """Batch norm with batch statistics (RH eq. 11, per channel), written with elementary ops.

    Replaces a batch norm that normalises with the batch statistics inside a pure functional
    copy: it tracks no running statistics, and -- the reason it exists -- its higher derivatives
    are right in every AD mode.  PyTorch's fused ``batch_norm`` has wrong second-order
    forward-mode derivatives (nested ``jvp``; pytorch/pytorch#196699) and wrong third-order
    reverse ones (#186256), which would silently corrupt the second-derivative estimates and the
    ascent of :mod:`.check` (tests/test_estimators.py checks every mode against finite
    differences).  Keeps the module's ``weight``/``bias`` Parameters, so ``named_parameters()``
    is unchanged.
    """

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        self.eps = float(bn.eps)
        self.weight = bn.weight  # Parameter or None; same object, same name
        self.bias = bn.bias

    def forward(self, x: Tensor) -> Tensor:
        out = batch_normalize(x, [0, *range(2, x.dim())], self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out


def _uses_batch_statistics(bn: _BatchNorm) -> bool:
    # PyTorch's own rule (_BatchNorm.forward): batch statistics in training mode, and in eval
    # mode when there are no running statistics to use
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _pure_copy(module: nn.Module, batch_statistics: bool | None) -> nn.Module:
    """The copy behind ``pure=True`` (see the module docstring)."""
    memo = {id(p): p for p in module.parameters()}  # share parameters: they are replaced in every call
    net = copy.deepcopy(module, memo)
    replaced: dict[int, nn.Module] = {}  # a batch norm used twice is replaced by one module
    for name, mod in list(net.named_modules(remove_duplicate=False)):
        if isinstance(mod, _BatchNorm):
            if batch_statistics is False:
                if mod.running_mean is None or mod.running_var is None:
                    raise ValueError(f"batch norm {name or '<root>'!r} tracks no running statistics: "
                                     "it cannot normalise without the batch statistics")
                mod.eval()
                continue
            if batch_statistics is None and not _uses_batch_statistics(mod):
                continue
            new = replaced.setdefault(id(mod), _TrainModeBatchNorm(mod))
            if not name:
                return new
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, new)
        elif isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.eval()
    return net


def _shape(shape) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


class FunctionalModule:
    """``module`` as a function ``(params, x) -> module(x)`` of its parameters; build it with
    :func:`make_functional_call`.

    ``names``, ``shapes``, ``sizes``: the parameters in ``named_parameters()`` order (tied ones
    once); ``numel`` = sum(sizes), the length p of the flat vector; ``module``: the module that is
    called (the module itself, or its pure copy); ``buffer_names``: the buffers of ``module``,
    the names that ``buffers=`` of :meth:`__call__` may replace.
    """

    def __init__(self, module: nn.Module, *, pure: bool = False, batch_statistics: bool | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
        if batch_statistics not in (None, True, False):
            raise ValueError(f"batch_statistics must be None, True or False, got {batch_statistics!r}")
        if batch_statistics is not None and not pure:
            raise ValueError("batch_statistics needs pure=True: batch norms are replaced in a copy, "
                             "never in the module itself")
        named = list(module.named_parameters())
        self.pure = bool(pure)
        self.batch_statistics = batch_statistics
        self.module = _pure_copy(module, batch_statistics) if pure else module
        self.names: tuple[str, ...] = tuple(n for n, _ in named)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for _, p in named)
        self.sizes: tuple[int, ...] = tuple(p.numel() for _, p in named)
        self.numel: int = sum(self.sizes)
        self.buffer_names: tuple[str, ...] = tuple(n for n, _ in self.module.named_buffers())

    def __repr__(self) -> str:
        return (f"FunctionalModule({type(self.module).__name__}, parameters={len(self.names)}, "
                f"numel={self.numel}, pure={self.pure}, batch_statistics={self.batch_statistics})")

    def _layout(self) -> str:
        items = [f"{n} {_shape(s)}" for n, s in zip(self.names, self.shapes)]
        if len(items) > 8:
            items = items[:8] + [f"... ({len(self.names)} parameters)"]
        return ", ".join(items) or "none"

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """The flat vector (``named_parameters()`` order) as tensors of the parameters' shapes
        (views of ``flat`` where possible)."""
        if not isinstance(flat, Tensor) or flat.dim() != 1 or flat.shape[0] != self.numel:
            got = tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__
            raise ValueError(f"expected a flat parameter vector of shape ({self.numel},), got {got}; "
                             f"parameters: {self._layout()}")
        return [c.reshape(s) for c, s in zip(torch.split(flat, self.sizes), self.shapes)]

    def flatten(self, tensors: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """The inverse of :meth:`unflatten`: tensors in ``named_parameters()`` order (or by name)
        flattened and concatenated (differentiable; nothing is detached)."""
        if isinstance(tensors, Tensor):
            raise TypeError("flatten takes a sequence or a mapping of tensors, got one tensor")
        named = self.named(tensors)
        if not named:
            return torch.empty(0)
        return torch.cat([named[n].reshape(-1) for n in self.names])

    def named(self, params: Params) -> dict[str, Tensor]:
        """``params`` (flat vector, sequence in ``named_parameters()`` order, or mapping by name)
        as the mapping name -> tensor that ``functional_call`` takes, shapes checked."""
        if isinstance(params, Tensor):
            return dict(zip(self.names, self.unflatten(params)))
        if isinstance(params, Mapping):
            missing = [n for n in self.names if n not in params]
            unexpected = [k for k in params if k not in self.names]
            if missing or unexpected:
                raise ValueError(f"parameters by name: missing {missing}, unexpected {unexpected}; "
                                 f"parameters: {self._layout()}")
            tensors = [params[n] for n in self.names]
        elif isinstance(params, Sequence) and not isinstance(params, str):
            tensors = list(params)
            if len(tensors) != len(self.names):
                raise ValueError(f"expected {len(self.names)} parameter tensors, got {len(tensors)}; "
                                 f"parameters: {self._layout()}")
        else:
            raise TypeError("params must be a flat tensor, a sequence of tensors or a mapping "
                            f"name -> tensor, got {type(params).__name__}")
        for n, s, t in zip(self.names, self.shapes, tensors):
            if not isinstance(t, Tensor):
                raise TypeError(f"parameter {n!r} must be a tensor, got {type(t).__name__}")
            if t.shape != s:
                raise ValueError(f"parameter {n!r} must have shape {_shape(s)}, got {_shape(t.shape)}")
        return dict(zip(self.names, tensors))

    def __call__(self, params: Params, x: Tensor, *, buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        """``module(x)`` with the parameters ``params`` (and, if given, the buffers ``buffers``
        by name, e.g. meta tensors for shape inference; by default the module's own)."""
        tensors = self.named(params)
        if buffers:
            unexpected = [k for k in buffers if k not in self.buffer_names]
            if unexpected:
                raise ValueError(f"unknown buffers {unexpected}; the module's buffers: "
                                 f"{list(self.buffer_names)}")
            tensors.update(buffers)
        out = functional_call(self.module, tensors, (x,))
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return one tensor, got {type(out).__name__}")
        return out


def make_functional_call(
    module: nn.Module, *, pure: bool = False, batch_statistics: bool | None = None
) -> FunctionalModule:
    """``module`` as a function ``f(params, x)`` of its parameters (:class:`FunctionalModule`).

    ``pure=False``: ``f`` calls the module itself, as it is (no copy; batch norm and dropout as
    their modes say, running statistics updated as by ``module(x)``) -- the oracles' convention.
    ``pure=True``: ``f`` calls a copy sharing the parameter tensors, deterministic and never
    writing to the module (module docstring) -- the estimators' convention.  With ``pure=True``,
    ``batch_statistics`` says which batch norms normalise with the batch statistics (RH eq. 11),
    by elementary ops: ``None``, those that would in ``module(x)`` (training mode, or no running
    statistics); ``True``, all of them (as after ``module.train()``, without updating running
    statistics); ``False``, none (all use their running statistics, as after ``module.eval()``).
    ``batch_statistics`` other than ``None`` needs ``pure=True``.
    """
    return FunctionalModule(module, pure=pure, batch_statistics=batch_statistics)
