"""Output helpers shared by the library's writers and the command line (torch-free).

* :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_with` -- a file
  appears complete or not at all: the data go to a temporary file in the same directory, which
  then replaces ``path`` (``os.replace``);
* :func:`new_figure`, :func:`save_figure` -- matplotlib figures on the Agg canvas, without
  switching matplotlib's backend or pyplot's global state; matplotlib is imported only inside them;
* :func:`fmt_number` -- the one number formatter of tables and reports ("inf" for infinities).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_write_with", "new_figure", "save_figure",
           "fmt_number"]


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], Any], *, fixed_tmp: bool = False) -> Path:
    """``writer(tmp)`` writes the file named ``tmp`` (same directory as ``path``), which then
    replaces ``path``; on any error the temporary file is removed and ``path`` is left as it was.

    ``tmp`` is a unique name, or with ``fixed_tmp`` ``PATH.tmp``: for a single writer (a
    checkpointing run), whose next write then overwrites and replaces what a killed one left.
    """
    path = Path(path)
    if fixed_tmp:
        tmp = str(path.with_name(path.name + ".tmp"))
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    try:
        writer(tmp)
        if not fixed_tmp:
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def uncreatable(path: str | os.PathLike) -> str | None:
    """Why the missing ``path`` (a file or a folder) cannot be created, or None: its nearest
    existing ancestor must be a directory one can write to."""
    top = Path(path)
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    if not top.parent.is_dir():
        return f"{top.parent} is not a directory"
    if not os.access(top.parent, os.W_OK | os.X_OK):
        return f"{top.parent} is not writable"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write_with`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write_with(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_with`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def new_figure(**kw: Any):
    """A ``matplotlib.figure.Figure(**kw)`` drawn by the Agg canvas (no pyplot, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, *, dpi: float | None = None, **savefig_kw: Any) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically."""
    return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, **savefig_kw))


def legend_below(fig, handles, labels, *, ncol: int | None = None, fontsize: float = 8,
                 top: float = 1.0) -> None:
    """One legend for the whole figure, centred below the axes (off the data: inside, it covered
    the curves' ends), then ``tight_layout`` leaving it room; ``top`` < 1 leaves room for a
    ``suptitle``.  ``ncol`` (default up to 3) is lowered until the legend fits the figure's width."""
    ncol = max(1, min(ncol or 3, len(labels)))
    renderer = fig.canvas.get_renderer()
    while True:
        legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=fontsize, frameon=False)
        if ncol == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width * 0.98:
            break
        legend.remove()
        ncol -= 1
    height = legend.get_window_extent(renderer).height / fig.dpi  # inches
    fig.tight_layout(rect=(0, min(0.6, (height + 0.1) / fig.get_figheight()), 1, top))


def fmt_number(x: Any, spec: str = ".4g", *, scale: float = 1.0, suffix: str = "", none: str = "-") -> str:
    """``format(scale * x, spec) + suffix``; "inf" (or "-inf") for infinities, ``none`` for None,
    a string unchanged."""
    if x is None:
        return none
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(scale * x if scale != 1.0 else x, spec) + suffix
