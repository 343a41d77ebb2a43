"""Optimizers of smoothchain: :class:`DSGD` (Flynn's duality structure gradient descent,
F Algo. 4.1), :class:`GaussNewton` and :class:`Newton` (RH eqs. (13)-(14) by the oracles of
:mod:`smoothchain.oracles`), :class:`CertifiedGD` (gradient descent with the step of a
smoothness certificate, RH Cor. 4.5 / Prop. 4.2 and the descent lemma).  Importable on their
own: ``from smoothchain.optim import DSGD``."""

from .certified_gd import CertifiedGD, CertifiedStep
from .dsgd import DSGD
from .newton import GaussNewton, Newton

__all__ = ["CertifiedGD", "CertifiedStep", "DSGD", "GaussNewton", "Newton"]
