"""smoothchain.report: atomic writes, figures without pyplot, the number formatter."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

from smoothchain.report import atomic_write_bytes, atomic_write_text, atomic_write_with, fmt_number, new_figure, save_figure


def test_atomic_writes_replace_and_leave_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["a.txt"]
    assert (p.stat().st_mode & 0o777) == 0o644


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def boom(tmp):
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write_with(p, boom)
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_figures_are_png_without_pyplot(tmp_path):
    pytest.importorskip("matplotlib")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    import matplotlib

    backend = matplotlib.get_backend() if had_pyplot else None
    fig = new_figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["f.png"]
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    if had_pyplot:
        assert matplotlib.get_backend() == backend


def test_fmt_number():
    assert fmt_number(math.inf) == "inf" and fmt_number(-math.inf, ".3e") == "-inf"
    assert fmt_number(None) == "-" and fmt_number("x") == "x"
    assert fmt_number(1234.5678) == "1235" and fmt_number(0.000123456, ".3e") == "1.235e-04"
    assert fmt_number(0.12345, ".2f", scale=100, suffix=" %") == "12.35 %"
    assert fmt_number(2.0, "") == "2.0" and fmt_number(math.inf, ".0f") == "inf" and fmt_number(1.0, ".0f") == "1"


def test_fixed_temporary_name_is_reused(tmp_path):
    """A killed single writer leaves PATH.tmp; the next write overwrites and replaces it."""
    p = tmp_path / "ck.pt"
    (tmp_path / "ck.pt.tmp").write_bytes(b"partial")
    atomic_write_with(p, lambda tmp: Path(tmp).write_bytes(b"full"), fixed_tmp=True)
    assert p.read_bytes() == b"full" and os.listdir(tmp_path) == ["ck.pt"]


@pytest.mark.parametrize("n_lines, ncol", [(1, None), (7, None), (6, 2), (4, 4)])
def test_legend_below_sits_off_every_axes(n_lines, ncol):
    """The legend's box lies entirely below every axes' box (titles and ticks included), inside
    the figure: it covers no data, whatever the number of entries."""
    pytest.importorskip("matplotlib")
    from smoothchain.report import legend_below

    fig = new_figure(figsize=(5.5, 4.2))
    axes = fig.subplots(1, 2)
    for k in range(n_lines):
        axes[0].plot([0, 1], [k, k + 1], label=f"a rather long method name {k}")
    axes[0].set_title("title")
    axes[0].set_xlabel("step")
    legend_below(fig, *axes[0].get_legend_handles_labels(), ncol=ncol)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in axes:
        tight = ax.get_tightbbox(renderer)
        assert box.y1 <= tight.y0 + 1, (box, tight)
    assert box.y0 >= 0 and box.x0 >= 0 and box.x1 <= fig.bbox.x1 + 1
