"""Command-line interface: a thin layer over the library (DESIGN.md).

``smoothchain certify``   certified bounds of a chain (RH Prop. 4.4 / Cor. 4.5, Prop. 4.2, Thm 4.1)
``smoothchain check``     estimates on C that the certificate must survive (exit 3 on violation)
``smoothchain vgg-study`` RH Sec. 5: VGG / VGG-smooth / VGG-bn table, claims and bar chart
``smoothchain pl``, ``rates``, ``train``, ``experiment``, ``complexity``: see their modules

Every subcommand accepts ``--json`` (one JSON document on stdout) and exits with status 2 and a
one-line error on bad input.  PyTorch is imported only when a module must be loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from ..chain import ChainError
from . import analysis, certify, oracles, train
from .common import CLIError, optional_dependency_message, torch_threads
from .options import integer

__all__ = ["main", "build_parser"]


# Modules that add subcommands: each defines ``register(subparsers)``, which adds its parser(s)
# and sets ``handler=`` (a function of the parsed args returning the exit status) with
# ``set_defaults``.  They import torch only inside their handlers, so that ``certify`` with a
# built-in or spec model stays torch-free, and they import from ``common``/``options`` and the
# library only (never from this module).
SUBCOMMANDS = (certify, analysis, train, oracles)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (the usage is one ``--help`` away), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smoothchain",
        description="Smoothness certificates for chains of layers (Roulet & Harchaoui).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    for command in sub.choices.values():  # every command: its PyTorch threads
        command.add_argument("--threads", type=integer(1), default=None, metavar="N",
                             help="PyTorch threads (default: OMP_NUM_THREADS, else the CPUs this process may "
                                  "use, shared among the local ranks of --nproc/torchrun)")
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, like the errors (no source line, no path); rank 0's only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"smoothchain: warning: {message}", file=sys.stderr)


def _say_error(message: str) -> None:
    """One line on stderr; in a multi-process run only rank 0 says it (every rank meets the same
    bad input, and the message once is enough)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"smoothchain: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `train --nproc` gives the processes it starts
    try:
        with warnings.catch_warnings(), torch_threads(args.threads):
            warnings.showwarning = _warning_line
            return args.handler(args)
    except (ChainError, CLIError) as err:
        _say_error(str(err))
        return 2
    except ModuleNotFoundError as err:
        # an optional dependency (scikit-learn, scipy, mnist1d: the "data" extra) is missing
        message = optional_dependency_message(err)
        if message is None:
            raise
        _say_error(message)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
