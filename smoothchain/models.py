"""Built-in architectures as component lists (no PyTorch needed to certify them).

* ``vgg16`` -- RH Sec. 5.1's VGG-16: 13 3x3 convolutions (padding 1) with ReLU and 2x2 max
  pooling, three fully connected layers, softmax over 1000 classes; input 3x224x224.
* ``vgg16-smooth`` -- the same with softplus and 2x2 average pooling (RH Sec. 5.1).
* ``vgg16-bn`` -- ``vgg16-smooth`` with batch normalisation (RH eq. 11, per entry across the
  batch, parameter ``bn_eps``) added to every convolutional layer after its activation and
  pooling (Def. 2.1 order, RH Sec. 5.2).
* ``mlp`` -- 64-32-10 with tanh, logits out (scikit-learn digits, 8x8 images flattened);
  ``wide`` -- the same with 256 hidden units (over-parameterised on a few samples: ``pl``).
* ``cnn`` -- for 1x8x8 digits: two 3x3 convolutions (8 and 16 filters, padding 1) each with
  softplus and 2x2 average pooling, then flatten and a linear layer to 10 logits.

:func:`torch_module` builds the matching ``nn.Sequential`` (for ``--around-weights``, tests and
training); the certificate of that module equals the one of the component list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .chain import ChainError
from .components import (
    AvgPool2d,
    BatchNorm,
    Component,
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Softmax,
    Softplus,
    Tanh,
)

__all__ = ["BuiltinModel", "builtin", "BUILTIN_MODELS"]

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclass(frozen=True)
class BuiltinModel:
    """A named architecture: its components (with display names) and default input shape."""

    name: str
    components: tuple[Component, ...]
    names: tuple[str, ...]
    input_shape: tuple[int, ...]


def _vgg16(variant: str, bn_eps: float = 1e-5, num_classes: int = 1000) -> BuiltinModel:
    smooth = variant != "vgg16"
    comps: list[Component] = []
    names: list[str] = []
    channels, conv_index = 3, 0
    for i, item in enumerate(VGG16_CONFIG):
        if item == "M":
            continue
        conv_index += 1
        comps.append(Conv2d(channels, item, 3, 1, 1))
        names.append(f"conv{conv_index}")
        comps.append(Softplus() if smooth else ReLU())
        names.append(f"conv{conv_index}.act")
        if i + 1 < len(VGG16_CONFIG) and VGG16_CONFIG[i + 1] == "M":
            comps.append(AvgPool2d(2) if smooth else MaxPool2d(2))
            names.append(f"conv{conv_index}.pool")
        if variant == "vgg16-bn":
            comps.append(BatchNorm(bn_eps, over="entry"))
            names.append(f"conv{conv_index}.bn")
        channels = item
    comps.append(Flatten())
    names.append("flatten")
    dims = (512 * 7 * 7, 4096, 4096, num_classes)
    for j in range(3):
        comps.append(Linear(dims[j], dims[j + 1]))
        names.append(f"fc{j + 1}")
        if j < 2:
            comps.append(Softplus() if smooth else ReLU())
            names.append(f"fc{j + 1}.act")
    comps.append(Softmax())
    names.append("softmax")
    return BuiltinModel(variant, tuple(comps), tuple(names), (3, 224, 224))


def _mlp(name: str = "mlp", hidden: int = 32) -> BuiltinModel:
    comps = (Linear(64, hidden), Tanh(), Linear(hidden, 10))
    return BuiltinModel(name, comps, ("fc1", "fc1.act", "fc2"), (64,))


def _cnn() -> BuiltinModel:
    comps = (
        Conv2d(1, 8, 3, 1, 1),
        Softplus(),
        AvgPool2d(2),
        Conv2d(8, 16, 3, 1, 1),
        Softplus(),
        AvgPool2d(2),
        Flatten(),
        Linear(16 * 2 * 2, 10),
    )
    names = ("conv1", "conv1.act", "conv1.pool", "conv2", "conv2.act", "conv2.pool", "flatten", "fc")
    return BuiltinModel("cnn", comps, names, (1, 8, 8))


BUILTIN_MODELS: dict[str, Callable[..., BuiltinModel]] = {
    "vgg16": lambda **kw: _vgg16("vgg16"),
    "vgg16-smooth": lambda **kw: _vgg16("vgg16-smooth"),
    "vgg16-bn": lambda bn_eps=1e-5, **kw: _vgg16("vgg16-bn", bn_eps=bn_eps),
    "mlp": lambda **kw: _mlp(),
    "wide": lambda **kw: _mlp("wide", 256),
    "cnn": lambda **kw: _cnn(),
}


def builtin(name: str, *, bn_eps: float = 1e-5) -> BuiltinModel:
    """The built-in architecture ``name`` (see the module docstring for the list)."""
    try:
        factory = BUILTIN_MODELS[name]
    except KeyError:
        raise ChainError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}") from None
    if not bn_eps > 0:
        raise ChainError(f"--bn-eps must be > 0, got {bn_eps}")
    return factory(bn_eps=bn_eps)
