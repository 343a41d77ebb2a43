"""The fast q = 1 / inf layer steps (smoothchain.dsgd.sign) against the reference duality maps of
smoothchain.dsgd.norms (F Prop. 4.5, eqs. 26, 27, 29), on [W | b]:

* ``sign_dual`` = ||[G_W | g_b]||_* (dense and large-layer routes, with and without bias, both
  dtypes), with ties and all-zero columns / rows (F's first arg max, sgn 0 = +1);
* ``apply_sign_step`` moves [W | b] by exactly -s rho(G) / ||G||_* = -s Q, with ||Q||_q = 1 and
  <G, Q> = ||G||_*;
* the optimizer's q = 1 greedy screening never changes the choice of F Algo. 4.1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from smoothchain.dsgd.norms import dual_norm, duality_map, matrix_norm  # noqa: E402
from smoothchain.dsgd.sign import apply_sign_step, sign_dual, sign_matrix  # noqa: E402
from smoothchain.optim import DSGD  # noqa: E402

QS = [1.0, math.inf]


def _gradient(seed, r, n, bias, dtype, ties):
    """A gradient with, optionally, integer entries (many ties), an all-zero column and row."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        GW = torch.randint(-2, 3, (r, n), generator=g).to(dtype)
        GW[:, 0] = 0.0
        GW[0] = 0.0
        gb = torch.randint(-2, 3, (r,), generator=g).to(dtype) if bias else None
    else:
        GW = torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype)
        gb = torch.randn(r, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return GW, gb


def _aug(GW, gb):
    return GW if gb is None else torch.cat([GW, gb[:, None]], 1)


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 7), n=st.integers(1, 7), bias=st.booleans(),
       q=st.sampled_from(QS), ties=st.booleans(), large=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_sign_step_is_the_duality_map(seed, r, n, bias, q, ties, large, dtype):
    GW, gb = _gradient(seed, r, n, bias, dtype, ties)
    G = _aug(GW, gb).double()
    dense_max = 0 if large else 10**9  # force the large-layer route
    info = sign_dual(GW, gb, q, dense_max=dense_max)
    N = dual_norm(G, q)
    assert info.norm == pytest.approx(N, rel=1e-12, abs=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(r, generator=g, dtype=torch.float64).to(dtype) if bias else None
    before = _aug(W, b).double().clone()
    s = 0.375  # exact in both dtypes, so the moved entries round like the reference
    buf = torch.empty_like(GW) if large else None
    apply_sign_step(W, b, info, q, s, buf=buf)
    moved = (before - _aug(W, b).double()) / s  # = Q
    rho, N_ref = duality_map(G, q)
    if N_ref > 0:
        # F eqs. (27) / (29): rho = ||G||_* Q with the first arg max and sgn 0 = +1
        torch.testing.assert_close(moved, rho / N_ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert torch.equal(sign_matrix(G, q), moved.round())  # the independent reference
    assert matrix_norm(moved.round(), q) == 1.0  # F (4a): ||Q||_q = 1
    assert float((G * moved.round()).sum()) == pytest.approx(N, rel=1e-12, abs=1e-300)  # F (4b)


def test_first_arg_max_and_bias_ties():
    """q = inf: the bias entry comes last in its row, so an equal |bias| loses; q = 1: the bias
    column has its own arg max.  sgn 0 = +1 in an all-zero row (F's notation)."""
    GW = torch.tensor([[1.0, -3.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    gb = torch.tensor([-3.0, 0.0, -5.0], dtype=torch.float64)
    W, b = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    apply_sign_step(W, b, sign_dual(GW, gb, math.inf), math.inf, 1.0)
    # row 0: |-3| ties with the bias -> W entry (0, 1), sign -; row 1: all zero -> (1, 0), +;
    # row 2: bias 5 > 2 -> bias, sign -
    assert W.tolist() == [[0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]] and b.tolist() == [0.0, 0.0, 1.0]
    W, b = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    d = sign_dual(GW, gb, 1.0)
    assert d.norm == 2.0 + 3.0 + 5.0
    apply_sign_step(W, b, d, 1.0, 1.0)
    assert W.tolist() == [[0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]] and b.tolist() == [0.0, 0.0, 1.0]


def _net(widths, seed=0):
    torch.manual_seed(seed)
    mods = []
    for a, b in zip(widths, widths[1:]):
        mods += [nn.Linear(a, b), nn.Sigmoid()]
    net = nn.Sequential(*mods).double()
    with torch.no_grad():
        for prm in net.parameters():
            prm.uniform_(-1, 1)
    return net


@pytest.mark.parametrize("q", QS, ids=["q1", "qinf"])
def test_greedy_screening_keeps_algorithm_41_choice(q):
    """Large layers (more entries than the screening threshold) next to small ones: the chosen
    layer is argmax ||g_i||_* / p_i computed from scratch at every step (F Algo. 4.1 line 9).
    With q = 1 the large layer is screened out (784-48-10: it loses, ``last_dual_norms`` None)
    or computed and chosen (4-200-200: it wins); both branches must occur."""
    outcomes = set()
    for widths in ([784, 48, 10], [4, 200, 200]):
        net = _net(widths)
        big = [i for i, m in enumerate(m for m in net if isinstance(m, nn.Linear)) if m.weight.numel() > 1 << 15]
        opt = DSGD(net, q=q, norm_refresh=1)
        assert opt._screened == [q == 1.0 and i in big for i in range(2)]
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.rand(16, widths[0], generator=g, dtype=torch.float64)
            z = torch.rand(16, widths[-1], generator=g, dtype=torch.float64)
            opt.zero_grad()
            ((net(x) - z) ** 2).sum(1).mean().backward()
            grads = [_aug(m.weight.grad, m.bias.grad) for m in net if isinstance(m, nn.Linear)]
            p = opt.layer_bounds()
            ratios = [dual_norm(G, q) / pi for G, pi in zip(grads, p)]
            opt.step()
            assert opt.last_layers == [int(np.argmax(ratios)) + 1]
            for i in big:
                outcomes.add(("skipped" if opt.last_dual_norms[i] is None else "computed",
                              opt.last_layers[0] == i + 1))
    if q == 1.0:
        assert {("skipped", False), ("computed", True)} <= outcomes
    else:
        assert all(kind == "computed" for kind, _ in outcomes)
