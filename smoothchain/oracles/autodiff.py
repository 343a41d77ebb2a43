"""The automatic-differentiation oracle of RH Def. 3.2 / Algo. 3 on ``torch.func``, and the
objective's pieces shared by every oracle.

RH's convention: for psi : R^p -> R^q, ``grad psi(w)`` is the p x q *transpose* of the Jacobian.
The oracle gives, after one forward pass (Algo. 1) that stores what the backward pass needs,

* ``backward(mu)``   = grad psi(w) mu        (Algo. 2, a vjp, reusing the stored forward pass),
* ``linearize(wt)``  = grad psi(w)^T wt      (the linearised network (32), a jvp).

Call counting (the unit of RH Sec. 3.3 and Prop. 3.5, where "a gradient step makes one call"):
one *call* is one sweep through the chain that applies derivative information -- one backward
sweep or one forward-mode linearisation sweep.  The primal forward pass that evaluates psi(w_t)
and records the vjp closure is done once per oracle and counted apart, in
:attr:`OracleCounter.forward_passes`; it is not a call.  (``torch.func.jvp`` recomputes the primal
values along with the tangents inside its single forward-mode sweep; that sweep is one call.)

The objective is F(w) = f(psi(w)) + r(w) with r(w) = l2/2 ||w||^2 and f a row of the loss table
(:mod:`smoothchain.losses`: ``"square"``, ``"cross-entropy"``, ``"autoencoder"``,
``"convex-clustering"``; the last has no Hessian, so gradient steps only), m = the batch size
(first dimension of the output).  Derivatives of f alone (grad f, Hessian-vector products) are
not chain sweeps and are not counted (RH Prop. 3.5's proof ignores them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..functional import make_functional_call
from ..losses import loss_names

__all__ = [
    "LOSSES",
    "SECOND_ORDER_LOSSES",
    "OracleCounter",
    "AutodiffOracle",
    "loss_grad",
    "loss_hvp",
    "loss_hessian",
    "model_parameters",
    "flat_dot",
]

#: the losses the step oracles accept, and those with a Hessian (Gauss-Newton, Newton)
LOSSES = loss_names(certified=True)
SECOND_ORDER_LOSSES = loss_names(certified=True, second_order=True)

Params = tuple[torch.Tensor, ...]


@dataclass
class OracleCounter:
    """Counts the chain sweeps of one oracle step (see the module docstring for the unit)."""

    forward_passes: int = 0
    backward_calls: int = 0
    linearize_calls: int = 0

    @property
    def calls(self) -> int:
        """Autodiff calls: backward sweeps plus linearisation sweeps."""
        return self.backward_calls + self.linearize_calls


def loss_grad(f: Callable, z: torch.Tensor) -> torch.Tensor:
    """grad f(z), shaped like z."""
    return torch.func.grad(f)(z)


def loss_hvp(f: Callable, z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """u -> grad^2 f(z) u (forward-over-reverse on f only; u shaped like z)."""
    grad_f = torch.func.grad(f)

    def hvp(u: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad_f, (z,), (u,))[1]

    return hvp


def loss_hessian(f: Callable, z: torch.Tensor) -> torch.Tensor:
    """grad^2 f(z) as a q x q matrix (q = z.numel())."""
    q = z.numel()
    return torch.func.hessian(f)(z).reshape(q, q)


def model_parameters(model: nn.Module) -> tuple[list[str], Params]:
    """Names and detached values of ``model.parameters()``, in that order."""
    named = list(model.named_parameters())
    plain = list(model.parameters())
    if len(named) != len(plain) or any(a is not b for (_, a), b in zip(named, plain)):
        raise ValueError("model.named_parameters() and model.parameters() disagree")
    return [n for n, _ in named], tuple(p.detach() for p in plain)


def flat_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i <a_i, b_i> over two lists of tensors."""
    return sum((ai * bi).sum() for ai, bi in zip(a, b))


class AutodiffOracle:
    """RH Algo. 3: ``psi(w)`` and the linear operator mu -> grad psi(w) mu, plus the linearisation.

    The forward pass runs once, in the constructor (``torch.func.vjp`` keeps the closure); every
    :meth:`backward` reuses it.  ``output`` is psi(w) with the model's output shape (m, ...).
    Every call is counted in ``counter`` (shared with the caller if one is passed).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, counter: OracleCounter | None = None):
        self.model = model
        self.x = x
        self.names, self.params = model_parameters(model)
        # the model as it is (no copy; batch norm and dropout as their modes say), RH Algo. 3
        self._call = make_functional_call(model)
        self.counter = counter if counter is not None else OracleCounter()
        self.output, self._vjp_fn = torch.func.vjp(self._psi, self.params)
        self.output = self.output.detach()
        self.counter.forward_passes += 1

    def _psi(self, params: Params) -> torch.Tensor:
        return self._call(params, self.x)

    @property
    def output_dim(self) -> int:
        """q, the dimension of psi(w) over the whole batch."""
        return self.output.numel()

    def backward(self, mu: torch.Tensor) -> list[torch.Tensor]:
        """grad psi(w) mu (a vjp, RH Algo. 2); mu shaped like ``output`` (or flat). One call."""
        self.counter.backward_calls += 1
        (g,) = self._vjp_fn(mu.reshape(self.output.shape))
        return [t.detach() for t in g]

    def linearize(self, w_tilde: Sequence[torch.Tensor]) -> torch.Tensor:
        """grad psi(w)^T w~ (a jvp, the linearised chain (32)), shaped like ``output``. One call."""
        self.counter.linearize_calls += 1
        _, out = torch.func.jvp(self._psi, (self.params,), (tuple(w_tilde),))
        return out.detach()
