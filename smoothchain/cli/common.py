"""What the ``smoothchain`` subcommands share (torch-free at import): the error type, the
optional-dependency message, model loading, tables and output.

Subcommand modules import from here and from :mod:`smoothchain.cli.options` only, never from
:mod:`smoothchain.cli.main` or the package (no import cycle).
"""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

__all__ = ["CLIError", "OPTIONAL_DEPENDENCIES", "optional_dependency_message", "load_module", "load_model",
           "LoadedModel", "errors_as_cli", "check_input_fits", "format_table", "emit", "check_output_file", "check_output_dir"]


class CLIError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


#: top-level modules of the "data" extra (pyproject.toml): a command that needs a missing one
#: fails with a one-line error naming it
OPTIONAL_DEPENDENCIES = ("sklearn", "scipy", "mnist1d")


def _creatable(path: Path, option: str) -> None:
    from ..report import uncreatable

    reason = uncreatable(path)
    if reason:
        raise CLIError(f"{option} {path}: cannot create it ({reason})")


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Validate an output file before any work (``option`` names it in the error): not a
    directory, and writable or creatable with its parent folders; the parents are created."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{option} {path} is a directory: give a file name")
    if path.exists():
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise CLIError(f"{option} {path} is not writable")
    else:
        _creatable(path, option)
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
    return path


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Validate an output directory before any work: not a file, writable or creatable (the
    command creates it when it writes)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path} is a file, not a directory: give a directory (created if missing)")
    if path.exists():
        if not os.access(path, os.W_OK | os.X_OK):
            raise CLIError(f"{option} {path} is not writable")
    else:
        _creatable(path, option)
    return path


def optional_dependency_message(err: ModuleNotFoundError) -> str | None:
    """The one-line error for a missing module of the "data" extra, None for any other module."""
    if err.name and err.name.split(".")[0] in OPTIONAL_DEPENDENCIES:
        return f"{err} -- install the optional dependencies with pip install 'smoothchain[data]'"
    return None


def load_module(ref: str):
    """``FILE.py:FACTORY`` -> the nn.Module returned by FACTORY()."""
    path_text, sep, factory = ref.rpartition(":")
    if not sep or not path_text or not factory:
        raise CLIError(f"--module must look like FILE.py:FACTORY, got {ref!r}")
    path = Path(path_text)
    if not path.is_file():
        raise CLIError(f"--module file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"smoothchain_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path} as a Python module")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as err:
        raise CLIError(f"importing {path} failed: {type(err).__name__}: {err}") from None
    fn = getattr(mod, factory, None)
    if fn is None or not callable(fn):
        raise CLIError(f"{path} has no callable {factory!r}")
    try:
        model = fn()
    except Exception as err:
        raise CLIError(f"{path}:{factory}() failed: {type(err).__name__}: {err}") from None
    from torch import nn

    if not isinstance(model, nn.Module):
        raise CLIError(f"{path}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


class LoadedModel(NamedTuple):
    module: Any  # torch.nn.Module
    name: str
    input_shape: tuple[int, ...] | None  # per example; None: unknown


def load_model(
    model: Any = None,
    module: str | None = None,
    *,
    input_shape: str | Sequence[int] | None = None,
    seed: int = 0,
    bn_eps: float = 1e-5,
    dtype: Any = None,
    shape_example: str | None = None,
) -> LoadedModel:
    """The PyTorch module of ``--module FILE.py:FACTORY`` or of ``--model`` (a built-in name or
    :class:`~smoothchain.models.BuiltinModel`, weights of :func:`~smoothchain.certificate.seeded_module`).

    The input shape is ``input_shape`` (``--input-shape``), else the model's (a module's
    ``input_shape`` attribute), else None -- or, with ``shape_example`` (e.g. ``"3,32,32 or
    784"``), a :class:`CLIError` asking for ``--input-shape``.  ``dtype``: a ``torch.dtype``
    to convert the module to.
    """
    from ..certificate import parse_input_shape, seeded_module
    from ..models import builtin

    if module:
        net, name = load_module(module), module
        default = getattr(net, "input_shape", None)
    else:
        arch = builtin(model, bn_eps=bn_eps) if isinstance(model, str) else model
        net, name, default = seeded_module(arch, seed=seed), arch.name, arch.input_shape
    if dtype is not None:
        net = net.to(dtype)
    shape = parse_input_shape(input_shape) if input_shape else default
    if shape is None and shape_example is not None:
        raise CLIError(f"--module needs --input-shape (per example, e.g. {shape_example})")
    return LoadedModel(net, name, None if shape is None else tuple(shape))


def check_input_fits(net: Any, shape: Sequence[int], where: str) -> None:
    """A :class:`CLIError` naming ``where`` (e.g. ``--data digits``) if ``net`` cannot take a batch
    of inputs of ``shape`` -- before any work, instead of a traceback in the middle of it."""
    import torch

    dtype = next((p.dtype for p in net.parameters()), torch.get_default_dtype())
    try:
        with torch.no_grad():
            net(torch.zeros((2,) + tuple(shape), dtype=dtype))
    except (RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CLIError(f"the model does not take the inputs of {where}, of shape {tuple(shape)} per example "
                       f"({first}); give a model that does, or --input-shape for --data random") from None


@contextmanager
def errors_as_cli(*types: type[BaseException], first_line: bool = False, with_type: bool = False) -> Iterator[None]:
    """Re-raise the library's errors of ``types`` as one-line :class:`CLIError`\\ s."""
    try:
        yield
    except types as err:
        text = f"{type(err).__name__}: {err}" if with_type else str(err)
        raise CLIError(text.splitlines()[0] if first_line and text else text) from None


def default_threads() -> int:
    """The CLI's default number of PyTorch threads: ``OMP_NUM_THREADS`` when set, else the CPUs
    this process may run on (its affinity mask, which honours ``taskset`` and container limits,
    unlike PyTorch's count of the machine's cores) shared among the local ranks of a
    multi-process run (``LOCAL_WORLD_SIZE``), at least 1 -- more threads than free cores makes
    small tensor operations several times slower."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cores // (int(ranks) if ranks.isdigit() and int(ranks) >= 1 else 1))


@contextmanager
def torch_threads(requested: int | None) -> Iterator[int]:
    """Run a command with ``requested`` (or :func:`default_threads`) PyTorch threads; restores
    the previous setting afterwards (the CLI called from Python leaves no trace).  PyTorch is not
    imported here: if it is not yet, ``OMP_NUM_THREADS`` tells it when a handler imports it."""
    import sys

    n = int(requested) if requested is not None else default_threads()
    old_env = os.environ.get("OMP_NUM_THREADS")
    torch = sys.modules.get("torch")
    old = torch.get_num_threads() if torch is not None else None
    os.environ["OMP_NUM_THREADS"] = str(n)
    if torch is not None:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if old_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_env
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(old if old is not None else n)


def format_table(rows: Sequence[Sequence[str]], right: Callable[[int], bool] = lambda i: False) -> list[str]:
    """Aligned columns (column ``i`` right-aligned where ``right(i)``), a dashed rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(widths[i]) if right(i) else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def emit(as_json: bool, doc: Any, text: str | Callable[[], str]) -> int:
    """Print ``doc`` as one JSON document (``--json``) or the human-readable ``text``; exit status 0."""
    print(json.dumps(doc) if as_json else (text() if callable(text) else text))
    return 0
