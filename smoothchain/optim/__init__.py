"""Optimizers of smoothchain: :class:`DSGD` (Flynn's duality structure gradient descent,
F Algo. 4.1), :class:`GaussNewton` and :class:`Newton` (RH eqs. (13)-(14) by the oracles of
:mod:`smoothchain.oracles`).  Importable on their own: ``from smoothchain.optim import DSGD``."""

from .dsgd import DSGD
from .newton import GaussNewton, Newton

__all__ = ["DSGD", "GaussNewton", "Newton"]
