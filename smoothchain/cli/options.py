"""argparse ``type=`` parsers shared by the ``smoothchain`` subcommands (torch-free).

Each returns the parsed value or raises ``argparse.ArgumentTypeError`` with a message naming
the constraint, which argparse turns into a one-line usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["real", "integer", "layer_norm"]


def real(low: float = 0.0, *, strict: bool = False, finite: bool = False) -> Callable[[str], float]:
    """A float >= ``low`` (> ``low`` if ``strict``), never NaN; infinite only unless ``finite``."""
    sign = ">" if strict else ">="
    what = f"a finite number {sign} {low:g}" if finite else f"{sign} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value):
            raise argparse.ArgumentTypeError("NaN is not allowed")
        if value < low or (strict and value == low) or (finite and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def integer(low: int = 1) -> Callable[[str], int]:
    """An int >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def layer_norm(text: str) -> float:
    """The layer norm q of DSGD (F Prop. 4.5): 1, 2 or inf."""
    t = text.strip().lower()
    if t in ("inf", "infinity"):
        return math.inf
    if t in ("1", "2"):
        return float(t)
    raise argparse.ArgumentTypeError(f"q must be 1, 2 or inf, got {text!r}")
