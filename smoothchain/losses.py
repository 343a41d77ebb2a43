"""The loss table: every loss f of the batch output, once, with its value and its constants.

Each :class:`Loss` says, in one place, what the rest of the library needs about it:

* ``value(z, y, x)``: f on the batch output z = psi(w) (shape (m, ...)), a scalar tensor that
  torch.func can differentiate (``y`` the targets, ``x`` the inputs; each loss says which it
  reads);
* ``rh_constants(...)``: RH's (l_f, L_f), the Lipschitz constant and smoothness of f on the
  chain's output set (RH App. B.1/B.2, ``paper`` and ``tight`` modes, proofs of the tight ones in
  docs/tight-constants.md), used by the certificate (RH Prop. 4.2);
* ``f_constants(n_out, q, data_bound)``: Flynn's (d_{q,1}, d_{q,2}), the sup of ||dJ/dy||_{q,*}
  and ||d^2 J/dy^2||_q of F Prop. 4.3, used by DSGD (F Table 1);
* ``second_order``: whether grad^2 f exists (Gauss-Newton and Newton steps need it).

The losses:

* ``"cross-entropy"``: f(z) = 1/m sum_i -log softmax(z_i)[y_i], y class indices or class
  probabilities shaped like z (PyTorch's ``cross_entropy`` with mean reduction);
* ``"square"``: f(z) = 1/(2m) sum_i ||z_i - y_i||^2, y shaped like z (DESIGN.md "Oracles");
* ``"autoencoder"``: the square loss with the inputs as targets (RH Sec. 2.2.2);
* ``"convex-clustering"``: RH eq. (25), a sum over the batch, C^1 but not C^2;
* ``"squared-error"``: F eqs. (21)-(22), f(z) = 1/m sum_i ||z_i - y_i||_2^2 (no 1/2), the
  objective DSGD's step sizes assume.

Nothing here imports PyTorch at module level: the certificate of a built-in model reads the
constants without it; the values take tensors and import what they need when called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .chain import ChainError

__all__ = [
    "Loss",
    "LossConstants",
    "LOSSES",
    "MODES",
    "get_loss",
    "loss_function",
    "rh_loss_constants",
    "f_loss_constants",
    "loss_names",
    "squared_error",
    "ALIASES",
    "SUPERVISED_LOSSES",
]

MODES = ("paper", "tight")


@dataclass(frozen=True)
class LossConstants:
    """RH's l_f and L_f of the loss f on the chain's output set (RH Appendix B.1/B.2)."""

    lipschitz: float
    smoothness: float
    name: str = ""


@dataclass(frozen=True)
class Loss:
    """One row of the loss table (see the module docstring)."""

    name: str
    reads: str  # "targets", "inputs" or "nothing"
    second_order: bool
    value: Callable[[Any, Any, Any], Any]
    rh_constants: Callable[..., LossConstants] | None = None
    f_constants: Callable[[int, float, float], tuple[float, float]] | None = None
    #: s where f(z) = (s/m) sum_i ||z_i - y_i||^2 (a square loss), else None; the PL constant of
    #: the lecture's "PL condition for MSE loss" scales with it (:func:`smoothchain.pl.mse_pl_constant`)
    square_scale: float | None = None


# --------------------------------------------------------------------------- values


def _cross_entropy(z, y, x):
    import torch

    if y is None:
        raise ValueError("the cross-entropy loss needs targets y")
    if y.is_floating_point():
        if y.shape != z.shape:
            raise ValueError(f"cross-entropy with class probabilities needs them shaped like the output "
                             f"{tuple(z.shape)}, got {tuple(y.shape)}")
        target = y.to(z.dtype)
    else:
        target = torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)
    # -sum(t log_softmax)/m written out: torch.func's jvp-of-grad of F.cross_entropy goes through
    # slow Python decompositions
    return -(target * torch.log_softmax(z, dim=-1)).sum() / z.shape[0]


def _targets_like(z, y, what: str):
    if y is None:
        raise ValueError(f"the {what} needs targets y")
    if y.shape != z.shape:
        if y.numel() != z.numel():
            raise ValueError(f"the {what} needs targets shaped like the output {tuple(z.shape)}, "
                             f"got {tuple(y.shape)}")
        y = y.reshape(z.shape)
    return y


def _square(z, y, x):
    return 0.5 * (z - _targets_like(z, y, "square loss")).pow(2).sum() / z.shape[0]


def _autoencoder(z, y, x):
    if x is None:
        raise ValueError("the autoencoder loss needs the inputs x (its targets)")
    m = z.shape[0]
    if x.shape[0] != m or x[0].numel() != z[0].numel():
        raise ValueError(f"the auto-encoder needs an output with as many entries per example as "
                         f"the input: output {tuple(z.shape)}, input {tuple(x.shape)}")
    return 0.5 * (z - x.reshape(z.shape)).pow(2).sum() / m


def _convex_clustering(z, y, x):
    from .oracles.clustering import convex_clustering

    return convex_clustering(z)


def squared_error(z, y, x=None):
    """F eqs. (21)-(22): the batch mean of ||z_i - y_i||_2^2 (no 1/2), summed over outputs."""
    err = z - _targets_like(z, y, "squared error")
    return err.pow(2).reshape(err.shape[0], -1).sum(dim=1).mean()


# --------------------------------------------------------------------------- RH constants


def _check_mode(mode: str, batch_size: int) -> float:
    if mode not in MODES:
        raise ChainError(f"unknown constants mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch_size < 1:
        raise ChainError(f"batch size must be >= 1, got {batch_size}")
    return float(batch_size)


def _rh_cross_entropy(*, batch_size, output_bound, mode, target_norm, input_norm) -> LossConstants:
    """paper (RH App. B.1): l = 2, L = 2.  tight: ||softmax(z_i) - y_i|| <= sqrt(2) and
    grad^2 f_i = diag(p) - p p^T has norm <= 1/2, with the 1/n of the mean: l = sqrt(2/n),
    L = 1/(2n)."""
    n = _check_mode(mode, batch_size)
    if mode == "paper":
        return LossConstants(2.0, 2.0, "cross-entropy")
    return LossConstants(math.sqrt(2.0 / n), 1.0 / (2.0 * n), "cross-entropy")


def _rh_square_with(rho_y: float, name: str, *, batch_size, output_bound, mode) -> LossConstants:
    n = _check_mode(mode, batch_size)
    if rho_y < 0 or math.isnan(rho_y):
        raise ChainError(f"target norm must be >= 0, got {rho_y}")
    if mode == "paper":
        return LossConstants(output_bound + rho_y, 1.0, name)
    return LossConstants((output_bound + math.sqrt(n) * rho_y) / n, 1.0 / n, name)


def _rh_square(*, batch_size, output_bound, mode, target_norm, input_norm) -> LossConstants:
    """f_i = ||z_i - y_i||^2 / 2 with ||y_i|| <= rho_Y (``target_norm``).  paper (RH App. B.1):
    l = rho_C + rho_Y (rho_C = ``output_bound``), L = 1.  tight: ||grad f|| = ||Z - Y||_F / n
    <= (rho_C + sqrt(n) rho_Y)/n, L = 1/n."""
    return _rh_square_with(target_norm, "square", batch_size=batch_size, output_bound=output_bound, mode=mode)


def _rh_autoencoder(*, batch_size, output_bound, mode, target_norm, input_norm) -> LossConstants:
    """The square loss with targets the inputs: rho_Y = ``input_norm``."""
    return _rh_square_with(input_norm, "autoencoder", batch_size=batch_size, output_bound=output_bound, mode=mode)


def _rh_convex_clustering(*, batch_size, output_bound, mode, target_norm, input_norm) -> LossConstants:
    """RH Prop. B.1: l = n(n-1)/2, L = 1.  grad f = D^T u with ||u_ij|| <= 1 and ||D||^2 = n (the
    pair-difference operator), so ||grad f|| <= n sqrt((n-1)/2), attained by a far-apart regular
    simplex: tight uses it; paper keeps the printed value where it is sound (not at n = 2)."""
    n = _check_mode(mode, batch_size)
    exact = n * math.sqrt((n - 1) / 2.0)
    lip = exact if mode == "tight" else max(n * (n - 1) / 2, exact)
    return LossConstants(lip, 1.0, "convex-clustering")


# --------------------------------------------------------------------------- F constants


def _f_squared_error(n_out: int, q: float, data_bound: float) -> tuple[float, float]:
    """F Table 1 for J(y) = ||y - z||_2^2 on R^{n_out} with |y_k| <= 1, |z_k| <= D:
    d_{q,1} = 2 (1 + D) n_out^{1 - 1/q} (the dual q'-norm of 2(y - z)) and
    d_{q,2} = 2 n_out^{max(0, 1 - 2/q)} (||2 I||_{q -> q'}, bilinear form)."""
    if not (q >= 1):
        raise ValueError(f"q must be a number >= 1 (or inf), got {q!r}")
    if not (0 <= data_bound < math.inf):
        raise ValueError(f"the data bound D must be a finite number >= 0, got {data_bound!r}")
    inv_q = 0.0 if q == math.inf else 1.0 / q
    d1 = 2.0 * (1.0 + data_bound) * n_out ** (1.0 - inv_q)
    d2 = 2.0 * n_out ** max(0.0, 1.0 - 2.0 * inv_q)
    return d1, d2


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("cross-entropy", "targets", True, _cross_entropy, _rh_cross_entropy),
        Loss("square", "targets", True, _square, _rh_square, square_scale=0.5),
        Loss("autoencoder", "inputs", True, _autoencoder, _rh_autoencoder, square_scale=0.5),
        Loss("convex-clustering", "nothing", False, _convex_clustering, _rh_convex_clustering),
        Loss("squared-error", "targets", True, squared_error, None, _f_squared_error, square_scale=1.0),
    )
}

#: other names of table rows: the lecture calls F's squared error "mse"
ALIASES = {"mse": "squared-error"}


def loss_names(*, certified: bool = False, second_order: bool = False, square: bool = False,
               reads: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Names of the losses with RH constants (``certified``), a Hessian (``second_order``), of the
    square form (s/m) sum ||z_i - y_i||^2 (``square``), reading only what ``reads`` lists
    (e.g. ``("targets",)``)."""
    return tuple(
        name for name, loss in LOSSES.items()
        if (not certified or loss.rh_constants is not None)
        and (not second_order or loss.second_order)
        and (not square or loss.square_scale is not None)
        and (reads is None or loss.reads in reads)
    )


def get_loss(name: str, among: tuple[str, ...] | None = None) -> Loss:
    """The table row of ``name``; ``among`` restricts the accepted names (ValueError naming them)."""
    names = tuple(LOSSES) + tuple(ALIASES) if among is None else among
    if name not in names:
        raise ValueError(f"loss must be one of {', '.join(names)}, got {name!r}")
    return LOSSES[ALIASES.get(name, name)]


def loss_function(name: str, y=None, x=None, among: tuple[str, ...] | None = None) -> Callable:
    """f(z) for the batch output z: the table's value with the targets ``y`` / inputs ``x`` bound."""
    loss = get_loss(name, among)
    if loss.reads == "targets" and y is None:
        raise ValueError(f"the {name} loss needs targets y")
    if loss.reads == "inputs" and x is None:
        raise ValueError(f"the {name} loss needs the inputs x (its targets)")
    y = None if y is None else y.detach()
    x = None if x is None else x.detach()
    value = loss.value
    if loss.name == "cross-entropy" and y is not None and not y.is_floating_point():
        # one-hot rows by a scatter at every call: no data-dependent shape, and no tensor cached
        # across calls (a cache filled inside a torch.func transform escapes its level)
        index = y.long().unsqueeze(-1)

        def f(z):
            return value(z, z.new_zeros(z.shape).detach().scatter(-1, index, 1.0), x)

        return f
    return lambda z: value(z, y, x)


def rh_loss_constants(
    loss: str,
    *,
    batch_size: int,
    output_bound: float,
    mode: str = "paper",
    target_norm: float = 1.0,
    input_norm: float = 1.0,
) -> LossConstants:
    """RH's (l_f, L_f) of the batch loss (1/n) sum_i f_i, n = ``batch_size`` (RH App. B.1/B.2):
    ``paper`` uses l_f <= max_i l_{f_i}, L_f <= max_i L_{f_i}; ``tight`` keeps the 1/n of the
    mean (grad f = (1/n)(grad f_i)_i).  ``output_bound`` is m_psi, ``target_norm`` rho_Y."""
    row = LOSSES.get(loss)
    if row is None or row.rh_constants is None:
        raise ChainError(f"unknown loss {loss!r}; choose one of {', '.join(loss_names(certified=True))}")
    return row.rh_constants(batch_size=batch_size, output_bound=output_bound, mode=mode,
                            target_norm=target_norm, input_norm=input_norm)


def f_loss_constants(n_out: int, q: float, data_bound: float = 1.0, loss: str = "squared-error"
                     ) -> tuple[float, float]:
    """Flynn's (d_{q,1}, d_{q,2}) of F Prop. 4.3 for ``loss`` on outputs of width ``n_out``."""
    row = LOSSES.get(loss)
    if row is None or row.f_constants is None:
        names = [n for n, r in LOSSES.items() if r.f_constants is not None]
        raise ValueError(f"no F constants for loss {loss!r}; DSGD supports {', '.join(names)}")
    return row.f_constants(int(n_out), q, data_bound)


#: the certified losses of a supervised batch (they read the targets y): cross-entropy, square
SUPERVISED_LOSSES = loss_names(certified=True, reads=("targets",))
