"""Optimization oracles on chains of layers (RH Sec. 3, App. C): gradient, Gauss-Newton and Newton
steps (eqs. (12)-(14)) by dynamic programming (Prop. 3.1, C.1, C.2), by the dual with an
automatic-differentiation oracle (Def. 3.2, Prop. 3.5), and dense references.
See ``docs/oracles.md``.
"""

from .autodiff import AutodiffOracle, OracleCounter
from .steps import StepResult, gauss_newton_step, gradient_step, newton_step

__all__ = ["StepResult", "gradient_step", "gauss_newton_step", "newton_step",
           "AutodiffOracle", "OracleCounter"]
