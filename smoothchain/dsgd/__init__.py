"""Duality structure gradient descent (Flynn, "F"): norms, duality maps, layer bounds, rates.

* :mod:`.norms` -- matrix operator q-norms, dual norms and duality maps (F Prop. 4.5), weighted
  product norms (F Prop. 4.6);
* :mod:`.bounds` -- the layer polynomials p_i(w) of F Prop. 4.3 for mixed widths and biases,
  F Assumption 4.1 checks, the objective (F eqs. 21-22);
* :mod:`.sign` -- the optimizer's in-place q = 1 / inf layer steps (F eqs. 26, 27, 29);
* :mod:`.lowrank` -- the optimizer's certified q = 2 polar factors from m x m cores (F eq. 28);
* :mod:`.structure` -- generic Finsler / duality structures and F Algo. 3.1 (with F Example 3.12);
* :mod:`.rates` -- step sizes and stopping-time bounds (F Thm 3.9, Cor. 3.10-3.11, Thm 4.8,
  Lemma 4.10, Thm 4.12).

The optimizer itself is :class:`smoothchain.optim.DSGD` (F Algo. 4.1).  See ``docs/dsgd.md``.
"""

from ..losses import f_loss_constants
from .bounds import (
    ACTIVATIONS,
    ActivationConstants,
    ChainConstants,
    check_data,
    layer_bounds,
    layer_bounds_from_norms,
    objective,
    parse_model,
)
from .norms import (
    dual_norm,
    duality_map,
    matrix_norm,
    product_dual_norm,
    product_duality_map,
    product_norm,
    spectral_norm,
)
from .rates import (
    batch_iterations,
    batch_step_size,
    corollary_310_bound,
    corollary_310_step_size,
    corollary_311_iterations,
    stochastic_step_size,
    stochastic_stopping_time_bound,
    stopping_time_bound,
    variance_bound,
    variance_bound_paper,
)
from .structure import DualityStructure, Euclidean, WeightedProduct, dsgd, example_312

__all__ = [
    "duality_map", "dual_norm", "matrix_norm", "spectral_norm",
    "product_norm", "product_dual_norm", "product_duality_map",
    "layer_bounds", "layer_bounds_from_norms", "f_loss_constants", "parse_model", "check_data",
    "objective", "ACTIVATIONS", "ActivationConstants", "ChainConstants",
    "DualityStructure", "Euclidean", "WeightedProduct", "dsgd", "example_312",
    "batch_step_size", "batch_iterations", "stochastic_step_size",
    "stochastic_stopping_time_bound", "stopping_time_bound", "corollary_310_step_size",
    "corollary_310_bound", "corollary_311_iterations", "variance_bound", "variance_bound_paper",
]
