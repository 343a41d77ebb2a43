"""In-place q = 1 / q = inf duality-map steps on a layer [W | b] (F Prop. 4.5, eqs. 26, 27, 29).

The pure functions behind :class:`smoothchain.optim.DSGD` for q in {1, inf}.  They act on a
layer's weight W (r x n), bias b (r, or None) and gradients G_W, g_b as on the one matrix
M = [W | b] (r x c, c = n + 1 with a bias) of F Sec. 4 / ``docs/dsgd.md``:

* q = 1 (columns):  ||G||_* = sum_j max_i |G_ij| and Q_ij = sgn(G_ij) at the first arg max i of
  each column j (F eqs. 26, 27); the bias is the last column;
* q = inf (rows):   ||G||_* = sum_i max_j |G_ij| and Q_ij = sgn(G_ij) at the first arg max j of
  each row i (F eqs. 26, 29); the bias entry comes last, so it wins a row only if strictly larger.

sgn 0 = +1 (F's notation section).  Every column (row) of Q has exactly one entry +-1, so
||Q||_q = 1 and <G, Q> = ||G||_* exactly: rho_q(G) = ||G||_* Q (F 4a-4b), and
:func:`apply_sign_step` performs M <- M - s Q, F Algo. 4.1 line 10 with
s = lr eps ||g_i||_* / p_i(w)^2.

Cost (this is the whole q = 1 / inf step, ``docs/dsgd.md`` section 4.1): one pass over |G| for
the dual norm (the maxima are exact in the layer dtype, summed in float64: relative error
<= gamma_c of float64), the arg maxima and one entry per column (row) for the update.  Small
layers (at most ``dense_max`` weight entries) are handled as the concatenated [G_W | g_b] with a
dense Q, which takes the fewest tensor operations (a step is dispatch-bound there).  For large
ones the dual norm takes two read-only passes, max |G_ij| = max(max G_ij, -min G_ij) (an abs
pass would write a gradient-sized temporary: measured slower, and a fresh 1 MB temporary per
step costs more than the reduction, large CPU allocations being new pages faulted in on first
use), and the update of the chosen layer (|G_W| into a caller-owned buffer, arg maxima, a
sparse ``scatter_add_`` of one entry per column or row) touches only the moved entries.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SignDual", "sign_dual", "apply_sign_step", "sign_matrix"]

_PM: dict = {}


def _plus_minus(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached 0-dim tensors (+1, -1) of ``dtype`` (for ``torch.where`` without a dtype cast)."""
    pm = _PM.get(dtype)
    if pm is None:
        pm = _PM[dtype] = (torch.ones((), dtype=dtype), -torch.ones((), dtype=dtype))
    return pm


class SignDual:
    """||[G_W | g_b]||_* and what :func:`apply_sign_step` needs (see :func:`sign_dual`)."""

    __slots__ = ("norm", "GW", "gb", "G", "idx")

    def __init__(self, norm: float, GW, gb, G, idx):
        self.norm = norm  # the dual norm (F eq. 26), a float
        self.GW, self.gb = GW, gb  # the gradient it describes
        self.G = G        # [G_W | g_b] (small layers), else None
        self.idx = idx    # first arg maxima of |G| (keepdim layout; small layers), else None


def sign_dual(GW: torch.Tensor, gb: torch.Tensor | None, q: float, *,
              dense_max: int = 1 << 15) -> SignDual:
    """The dual norm ||[G_W | g_b]||_{q,*} of F eq. (26) for q = 1 (``q == 1.0``) or q = inf.

    Small layers (``G_W.numel() <= dense_max``) also keep [G_W | g_b] and its arg maxima
    for :func:`apply_sign_step`; large ones only the norm."""
    dim = 0 if q == 1.0 else 1
    if GW.numel() <= dense_max:
        G = GW if gb is None else torch.cat((GW, gb.unsqueeze(1)), 1)
        vals, idx = G.abs().max(dim=dim, keepdim=True)  # the first maximiser (torch docs)
        return SignDual(float(vals.sum(dtype=torch.float64)), GW, gb, G, idx)
    # large layer: max |G_ij| = max(max G_ij, -min G_ij), two read-only passes (an abs pass
    # would also write a gradient-sized temporary)
    vals = torch.maximum(GW.amax(dim=dim), GW.amin(dim=dim).neg_())
    if gb is None:
        total = vals.sum(dtype=torch.float64)
    elif dim == 0:  # the bias is one more column
        total = vals.sum(dtype=torch.float64) + gb.abs().amax()
    else:  # one more entry in every row
        total = torch.maximum(vals, gb.abs()).sum(dtype=torch.float64)
    return SignDual(float(total), GW, gb, None, None)


def apply_sign_step(W: torch.Tensor, b: torch.Tensor | None, info: SignDual, q: float, s: float,
                    *, buf: torch.Tensor | None = None) -> None:
    """[W | b] <- [W | b] - s Q in place, Q the sign matrix of F eq. (27) (q = 1) or (29)
    (q = inf) of the gradient [G_W | g_b] that ``info`` (from :func:`sign_dual`) describes.  ||s Q||_q = s exactly; each moved entry is rounded once (w -+ fl(s)).  ``buf``
    (a tensor like G_W, optional) receives |G_W| for a large layer's arg maxima."""
    dim = 0 if q == 1.0 else 1
    one, mone = _plus_minus(W.dtype)
    n = W.shape[1]
    if info.G is not None:  # small layer: dense -sgn at the arg maxima, one add per tensor
        G, idx = info.G, info.idx
        neg_sgn = torch.where(G.gather(dim, idx) < 0, one, mone)  # -sgn(g), sgn 0 = +1
        D = torch.zeros_like(G).scatter_(dim, idx, neg_sgn)
        if b is None:
            W.add_(D, alpha=s)
        else:
            W.add_(D.narrow(1, 0, n), alpha=s)
            b.add_(D.select(1, n), alpha=s)
        return
    # large layer: arg maxima of |G_W|, sparse updates of W and b
    GW, gb = info.GW, info.gb
    A = GW.abs() if buf is None else torch.abs(GW, out=buf)
    vals, idx = A.max(dim=dim, keepdim=True)
    if dim == 0:  # one entry per column; the bias column has its own arg max
        W.scatter_add_(0, idx, torch.where(GW.gather(0, idx) < 0, one, mone).mul_(s))
        if b is not None:
            bi = gb.abs().argmax(dim=0, keepdim=True)
            b.scatter_add_(0, bi, torch.where(gb.gather(0, bi) < 0, one, mone).mul_(s))
        return
    step_w = torch.where(GW.gather(1, idx) < 0, one, mone).mul_(s)
    if b is not None:  # the bias entry, last in its row, wins only if strictly larger
        use_b = gb.abs().unsqueeze(1) > vals
        step_w.masked_fill_(use_b, 0.0)
        b.add_(torch.where(gb < 0, one, mone).mul_(s).masked_fill_(~use_b.view(-1), 0.0))
    W.scatter_add_(1, idx, step_w)


def sign_matrix(G: torch.Tensor, q: float) -> torch.Tensor:
    """Q of F eq. (27) (q = 1) / (29) (q = inf) for a dense matrix G: a reference for tests."""
    if q not in (1.0, math.inf):
        raise ValueError(f"sign duality maps exist for q = 1 or inf, got {q!r}")
    dim = 0 if q == 1.0 else 1
    idx = G.abs().argmax(dim=dim, keepdim=True)
    g_at = G.gather(dim, idx)
    return torch.zeros_like(G).scatter_(dim, idx, torch.where(g_at >= 0, 1.0, -1.0).to(G.dtype))
