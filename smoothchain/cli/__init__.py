"""The ``smoothchain`` command line (``smoothchain = "smoothchain.cli:main"``, ``python -m smoothchain``).

* :mod:`.main` -- the parser and :func:`main` (exit status 2 with one line on bad input);
* :mod:`.common` -- what the subcommands share: :class:`CLIError`, model loading, tables, output;
* :mod:`.options` -- argparse types;
* :mod:`.certify` (certify, check, vgg-study), :mod:`.analysis` (pl, rates), :mod:`.train`
  (train, experiment), :mod:`.oracles` (complexity) -- the subcommands, each a ``register(sub)``.
"""

from .common import CLIError
from .main import build_parser, main

__all__ = ["main", "build_parser", "CLIError"]
