"""Dense references (``method="dense"``): full Jacobian / Hessian with ``torch.func``, direct solves.

These build the p x p matrices of (27)-(29) (RH App. C.2, proof of Prop. 3.1) on the flat
parameter vector w (``model.parameters()`` flattened and concatenated), so they are only for
small models and for testing the structured oracles:

* gradient (27):      w~ = -gamma (J g + l2 w)
* Gauss-Newton (28):  (J H J^T + (l2 + 1/gamma) I) w~ = -(J g + l2 w)
* Newton (29):        (grad^2 (f o psi)(w) + (l2 + 1/gamma) I) w~ = -(J g + l2 w), with gamma
  halved (as in RH Algo. 4) until the matrix is positive definite (Cholesky succeeds).

J = grad psi(w) (p x q), g = grad f(psi(w)), H = grad^2 f(psi(w)).  Counted calls: the Jacobian
costs q backward sweeps (``jacrev``, one vjp per output coordinate, vectorised); the Newton
Hessian costs p forward-over-reverse sweeps (``hessian`` = ``jacfwd(jacrev)``) plus one backward
sweep for the gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..functional import make_functional_call
from .autodiff import OracleCounter, loss_grad, loss_hessian, model_parameters

__all__ = ["DenseProblem", "dense_problem", "dense_gradient", "dense_gauss_newton",
           "dense_newton", "newton_hessian"]


class DenseProblem:
    """psi and F = f o psi + l2/2 ||.||^2 as functions of the flat parameter vector."""

    def __init__(self, model: nn.Module, x: torch.Tensor, f: Callable, l2: float):
        self.model, self.x, self.f, self.l2 = model, x, f, l2
        self.names, params = model_parameters(model)
        # the model as it is (no copy), as the structured oracles call it
        self._call = make_functional_call(model)
        self.shapes = list(self._call.shapes)
        self.sizes = list(self._call.sizes)
        self.w = self._call.flatten(params)

    def unflatten(self, w: torch.Tensor) -> list[torch.Tensor]:
        """The flat vector w as tensors shaped like ``model.parameters()``."""
        return self._call.unflatten(w)

    def psi(self, w: torch.Tensor) -> torch.Tensor:
        """psi(w) = the model's output on the batch, with the flat parameters w."""
        return self._call(w, self.x)

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """f(psi(w)) (without the regulariser)."""
        return self.f(self.psi(w))

    def jacobian(self, counter: OracleCounter) -> tuple[torch.Tensor, torch.Tensor]:
        """(psi(w), grad psi(w)) with grad psi(w) = J, p x q (RH convention)."""
        z = self.psi(self.w).detach()
        counter.forward_passes += 1
        counter.backward_calls += z.numel()
        Jt = torch.func.jacrev(lambda w: self.psi(w).reshape(-1))(self.w)   # q x p
        return z, Jt.T.detach()


def dense_problem(model, x, f, l2) -> DenseProblem:
    return DenseProblem(model, x, f, l2)


def dense_gradient(model, x, f, l2, gamma, counter: OracleCounter) -> list[torch.Tensor]:
    prob = DenseProblem(model, x, f, l2)
    z, J = prob.jacobian(counter)
    g = loss_grad(f, z).reshape(-1)
    return prob.unflatten(-gamma * (J @ g + l2 * prob.w))


def dense_gauss_newton(model, x, f, l2, gamma, counter: OracleCounter) -> list[torch.Tensor]:
    prob = DenseProblem(model, x, f, l2)
    z, J = prob.jacobian(counter)
    g = loss_grad(f, z).reshape(-1)
    H = loss_hessian(f, z)
    G = J @ H @ J.T
    M = 0.5 * (G + G.T) + (l2 + 1.0 / gamma) * torch.eye(G.shape[0], dtype=G.dtype)
    return prob.unflatten(torch.linalg.solve(M, -(J @ g + l2 * prob.w)))


def newton_hessian(prob: DenseProblem, counter: OracleCounter) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad F, grad^2 F) of F(w) = f(psi(w)) + l2/2 ||w||^2, dense."""
    counter.forward_passes += 1
    counter.backward_calls += 1
    counter.linearize_calls += prob.w.numel()
    grad = torch.func.grad(prob.loss)(prob.w) + prob.l2 * prob.w
    hess = torch.func.hessian(prob.loss)(prob.w)
    hess = 0.5 * (hess + hess.T) + prob.l2 * torch.eye(hess.shape[0], dtype=hess.dtype)
    return grad.detach(), hess.detach()


def dense_newton(model, x, f, l2, gamma, counter: OracleCounter, *, max_halvings: int = 100):
    """Newton direction (29); returns (direction, gamma used, feasible at the requested gamma)."""
    prob = DenseProblem(model, x, f, l2)
    grad, hess = newton_hessian(prob, counter)
    eye = torch.eye(hess.shape[0], dtype=hess.dtype)
    feasible = True
    for _ in range(max_halvings + 1):
        L, info = torch.linalg.cholesky_ex(hess + eye / gamma)
        if int(info) == 0:
            break
        feasible = False
        gamma = gamma / 2.0
    else:
        raise RuntimeError(f"Newton step still infeasible after {max_halvings} halvings of gamma")
    step = -torch.cholesky_solve(grad.unsqueeze(1), L).squeeze(1)
    return prob.unflatten(step), gamma, feasible
