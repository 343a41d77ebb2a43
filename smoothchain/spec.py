"""The ``--spec`` JSON format (DESIGN.md): explicit constants of a chain and its loss.

``"inf"`` (or ``Infinity``) stands for an infinite constant.  Every layer may also carry an
optional ``"weight_norm"`` (||v*_l||, for ``--around-weights``), an extension of the format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chain import BilinearConstants, Chain, ChainError, ComponentConstants, Layer
from .objective import LossConstants

__all__ = ["Spec", "load_spec", "parse_spec", "spec_to_dict", "json_number"]

_BILINEAR = ("smoothness", "weight_lipschitz", "input_lipschitz", "offset_norm")
_NONLINEAR = ("bound", "lipschitz", "smoothness", "value_at_zero", "jacobian_at_zero")


class SpecError(ChainError):
    """Malformed ``--spec`` file."""


@dataclass(frozen=True)
class Spec:
    chain: Chain
    loss: LossConstants
    regularization_smoothness: float


def json_number(x: float) -> float | str:
    """DESIGN.md: infinite constants are the JSON string "inf"; other numbers plain floats."""
    x = float(x)
    if math.isinf(x):
        return "inf"
    return x


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "+inf", "infinity"):
            return math.inf
        raise SpecError(f"{where}: expected a number or \"inf\", got the string {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: expected a number or \"inf\", got {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0:
        raise SpecError(f"{where}: constants must be >= 0 or \"inf\", got {value}")
    return value


def _fields(obj: Any, keys: tuple[str, ...], where: str, defaults: dict[str, float] | None = None) -> dict[str, float]:
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: expected an object with keys {', '.join(keys)}, got {type(obj).__name__}")
    unknown = set(obj) - set(keys) - {"name"}
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(keys)}")
    out = {}
    for k in keys:
        if k not in obj:
            if defaults is not None and k in defaults:
                out[k] = defaults[k]
                continue
            raise SpecError(f"{where}: missing key {k!r}")
        out[k] = _number(obj[k], f"{where}.{k}")
    return out


def parse_spec(data: Any) -> Spec:
    """Validate a decoded spec document and build the chain and loss constants."""
    if not isinstance(data, dict):
        raise SpecError("spec: the top level must be a JSON object")
    unknown = set(data) - {"input_norm", "radius", "layers", "loss", "regularization_smoothness"}
    if unknown:
        raise SpecError(f"spec: unknown key(s) {', '.join(sorted(unknown))}")
    layers_data = data.get("layers")
    if not isinstance(layers_data, list) or not layers_data:
        raise SpecError("spec: 'layers' must be a non-empty list")
    layers = []
    for i, item in enumerate(layers_data, start=1):
        where = f"layers[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{where}: expected an object")
        extra = set(item) - {"name", "bilinear", "nonlinear", "weight_norm"}
        if extra:
            raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        if "bilinear" not in item:
            raise SpecError(f"{where}: missing key 'bilinear'")
        bil = BilinearConstants(**_fields(item["bilinear"], _BILINEAR, f"{where}.bilinear"))
        nl_data = item.get("nonlinear", [])
        if not isinstance(nl_data, list):
            raise SpecError(f"{where}.nonlinear: expected a list")
        nonlinear = []
        for j, comp in enumerate(nl_data, start=1):
            vals = _fields(comp, _NONLINEAR, f"{where}.nonlinear[{j}]")
            nonlinear.append(ComponentConstants(name=str(comp.get("name", "")), **vals))
        weight_norm = item.get("weight_norm")
        if weight_norm is not None:
            weight_norm = _number(weight_norm, f"{where}.weight_norm")
        layers.append(Layer(bil, tuple(nonlinear), str(item.get("name", f"layer{i}")), weight_norm))
    loss = _fields(data.get("loss", {}), ("lipschitz", "smoothness"), "loss")
    reg = _number(data.get("regularization_smoothness", 0.0), "regularization_smoothness")
    radius = _number(data.get("radius", 1.0), "radius")
    input_norm = _number(data.get("input_norm", 1.0), "input_norm")
    chain = Chain(tuple(layers), input_norm=input_norm, radius=radius)
    return Spec(chain, LossConstants(loss["lipschitz"], loss["smoothness"], "spec"), reg)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a ``--spec`` file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"spec file {path} is not valid JSON: {err}") from None
    return parse_spec(data)


def spec_to_dict(chain: Chain, loss: LossConstants, regularization_smoothness: float = 0.0) -> dict:
    """The spec document of a chain (round-trips through :func:`parse_spec`)."""
    layers = []
    for layer in chain.layers:
        b = layer.bilinear
        entry: dict[str, Any] = {
            "name": layer.name,
            "bilinear": {k: json_number(getattr(b, k)) for k in _BILINEAR},
            "nonlinear": [
                dict(name=a.name, **{k: json_number(getattr(a, k)) for k in _NONLINEAR}) for a in layer.nonlinear
            ],
        }
        if layer.weight_norm is not None:
            entry["weight_norm"] = json_number(layer.weight_norm)
        layers.append(entry)
    return {
        "input_norm": json_number(chain.input_norm),
        "radius": json_number(chain.radius),
        "layers": layers,
        "loss": {"lipschitz": json_number(loss.lipschitz), "smoothness": json_number(loss.smoothness)},
        "regularization_smoothness": json_number(regularization_smoothness),
    }
