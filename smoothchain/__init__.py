"""smoothchain: smoothness certificates for chains of layers (Roulet & Harchaoui), structured
oracles and duality-structure gradient descent (Flynn).

The certificate path (chains, constants, recursions, built-in models, specs) is pure Python;
PyTorch is imported only when a ``torch.nn.Module`` is converted.
"""

from .chain import BilinearConstants, Chain, ChainError, ComponentConstants, Layer
from .components import Custom
from .certificate import Certificate, build_chain, certify, certify_chain
from .objective import LossConstants, ObjectiveBounds, loss_constants, objective_bounds
from .recursion import ChainBounds, LayerBound, chain_bounds, composite_bounds, generic_chain_bounds
from .spec import load_spec, parse_spec, spec_to_dict

__version__ = "0.1.0"

__all__ = [
    "BilinearConstants", "ComponentConstants", "Layer", "Chain", "ChainError", "Custom",
    "Certificate", "certify", "certify_chain", "build_chain",
    "LossConstants", "ObjectiveBounds", "loss_constants", "objective_bounds",
    "ChainBounds", "LayerBound", "chain_bounds", "composite_bounds", "generic_chain_bounds",
    "load_spec", "parse_spec", "spec_to_dict", "register_module", "register_component",
]


def register_module(module_type, converter):
    """Declare the components of a PyTorch module type (see :func:`smoothchain.torch_chain.register_module`)."""
    from .torch_chain import register_module as _register

    _register(module_type, converter)


def register_component(component_type):
    """Register a component class for its ``torch_types`` (see
    :func:`smoothchain.torch_chain.register_component`; usable as a class decorator)."""
    from .torch_chain import register_component as _register

    return _register(component_type)
