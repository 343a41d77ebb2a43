"""Matrix q-norms, dual norms and duality maps (F Prop. 4.5) and product norms (F Prop. 4.6).

* duality-map identities (F 4a, 4b) to 1e-6 on hypothesis matrices, q = 1, 2, inf, both q = 2
  methods, numpy and torch inputs;
* dual norms equal sup{<G, A> : ||A||_q <= 1} computed independently: vertex enumeration of the
  unit ball (q = 1: products of l1-balls per column; q = inf: per row) and, for q = 2, the
  closed form over 2 x 2 orthogonal matrices (the extreme points of the spectral ball);
* operator norms against their definition (sup over ball vertices) and exact spectral norms
  against numpy / power iteration (ours must never be below);
* product spaces: dual norm, duality map and tie-breaking of F Prop. 4.6, brute-forced.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch")

from smoothchain.dsgd import norms  # noqa: E402
from smoothchain.dsgd.norms import dual_norm, duality_map, matrix_norm, spectral_norm  # noqa: E402
from smoothchain.dsgd.norms import product_dual_norm, product_duality_map, product_norm  # noqa: E402

QS = [1, 2, math.inf]
TOL = 1e-6


def matrices(max_side=6, max_value=1e3):
    shapes = st.tuples(st.integers(1, max_side), st.integers(1, max_side))
    elems = st.floats(-max_value, max_value, allow_nan=False, allow_infinity=False,
                      allow_subnormal=False, width=64)
    return shapes.flatmap(lambda s: hnp.arrays(np.float64, s, elements=elems))


def _vec_norm(x: np.ndarray, q: float) -> float:
    return float(np.linalg.norm(x.ravel(), ord=q))


def _ref_operator_norm(A: np.ndarray, q: float) -> float:
    """sup ||A x||_q over the vertices of the unit q-ball (q = 1: +-e_j; q = inf: sign vectors);
    numpy's 2-norm for q = 2."""
    c = A.shape[1]
    if q == 1:
        return max(_vec_norm(A[:, j], 1) for j in range(c))
    if q == math.inf:
        return max(_vec_norm(A @ np.array(s), math.inf)
                   for s in itertools.product([-1.0, 1.0], repeat=c))
    return float(np.linalg.norm(A, 2))


def _ref_dual_norm_polytope(G: np.ndarray, q: float) -> float:
    """sup <G, A> over the vertices of {||A||_q <= 1}: for q = 1, each column of A is a vertex
    +-e_i of the l1-ball; for q = inf, each row.  Brute force, independent of F eq. (26)."""
    r, c = G.shape
    if q == math.inf:
        return _ref_dual_norm_polytope(G.T, 1)
    best = -math.inf
    col_vertices = [(i, s) for i in range(r) for s in (-1.0, 1.0)]
    for choice in itertools.product(col_vertices, repeat=c):
        A = np.zeros((r, c))
        for j, (i, s) in enumerate(choice):
            A[i, j] = s
        best = max(best, float((G * A).sum()))
    return best


def _ref_nuclear_2x2(G: np.ndarray) -> float:
    """sup <G, A> over 2 x 2 orthogonal A (rotations and reflections), in closed form."""
    a, b, c, d = G.ravel()
    return max(math.hypot(a + d, c - b), math.hypot(a - d, b + c))


# ------------------------------------------------------------------------------------------
# Duality-map identities
# ------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(G=matrices(), q=st.sampled_from(QS))
def test_duality_map_identities(G, q):
    rho, N = duality_map(G, q)
    assert isinstance(rho, np.ndarray) and rho.shape == G.shape
    scale = max(N, 1e-300)
    assert abs(matrix_norm(rho, q) - N) <= TOL * scale          # F (4a)
    assert abs(float((G * rho).sum()) - N * N) <= TOL * scale**2  # F (4b)
    assert abs(N - dual_norm(G, q)) <= TOL * scale


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1), shape=st.tuples(st.integers(33, 60), st.integers(33, 70)),
       rank=st.integers(1, 40), q=st.sampled_from(QS))
def test_duality_map_identities_large_and_low_rank(seed, shape, rank, q):
    """Larger matrices (the ``gram`` path for q = 2), of full or exactly low rank, float32."""
    g = torch.Generator().manual_seed(seed)
    r, c = shape
    k = min(rank, r, c)
    G = (torch.randn(r, k, generator=g, dtype=torch.float64)
         @ torch.randn(k, c, generator=g, dtype=torch.float64))
    for method in (["gram", "svd"] if q == 2 else ["auto"]):
        rho, N = duality_map(G, q, method=method)
        assert rho.dtype == torch.float64
        assert abs(matrix_norm(rho, q) - N) <= TOL * N
        assert abs(float((G * rho).sum()) - N * N) <= TOL * N * N
    if q == 2:  # the two methods agree with the nuclear norm
        nuc = torch.linalg.matrix_norm(G, ord="nuc").item()
        assert dual_norm(G, 2, method="gram") == pytest.approx(nuc, rel=TOL)
        assert dual_norm(G, 2, method="svd") == pytest.approx(nuc, rel=1e-12)
    rho32, N32 = duality_map(G.float(), q)
    assert rho32.dtype == torch.float32 and N32 == pytest.approx(N, rel=1e-4)


@pytest.mark.parametrize("q", QS)
def test_duality_map_zero_and_vector(q):
    rho, N = duality_map(torch.zeros(3, 4), q)
    assert N == 0.0 and torch.count_nonzero(rho) == 0
    v = np.array([3.0, -4.0, 0.0])  # a 1-D tensor is a column: vector q-norm, conjugate dual
    qd = {1: math.inf, 2: 2, math.inf: 1}[q]
    assert matrix_norm(v, q) == pytest.approx(_vec_norm(v, q))
    assert dual_norm(v, q) == pytest.approx(_vec_norm(v, qd))
    rho, N = duality_map(v, q)
    assert rho.shape == v.shape and float(v @ rho) == pytest.approx(N * N)


def test_duality_map_paper_formulas():
    """F eqs. (27)-(29) on a hand example, with F's tie-breaking (first arg max, sgn 0 = +1)."""
    G = np.array([[1.0, -3.0, 0.0], [-2.0, 3.0, 0.0]])
    rho1, n1 = duality_map(G, 1)  # column maxima: 2, 3 (first row wins the tie), 0
    assert n1 == 5.0
    np.testing.assert_array_equal(rho1, 5.0 * np.array([[0, -1, 1], [-1, 0, 0]]))
    rhoi, ni = duality_map(G, math.inf)  # row maxima: 3, 3
    assert ni == 6.0
    np.testing.assert_array_equal(rhoi, 6.0 * np.array([[0, -1, 0], [0, 1, 0]]))
    rho2, n2 = duality_map(G, 2)
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    np.testing.assert_allclose(rho2, S.sum() * U @ Vt, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Dual norms and operator norms from their definitions
# ------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(G=matrices(max_side=3, max_value=10.0), q=st.sampled_from([1, math.inf]))
def test_dual_norm_is_sup_over_unit_ball_polytope(G, q):
    assert dual_norm(G, q) == pytest.approx(_ref_dual_norm_polytope(G, q), rel=1e-12, abs=1e-12)


@settings(deadline=None, max_examples=40)
@given(G=hnp.arrays(np.float64, (2, 2), elements=st.floats(-10, 10, width=64)))
def test_nuclear_norm_is_sup_over_orthogonal_matrices(G):
    assert dual_norm(G, 2) == pytest.approx(_ref_nuclear_2x2(G), rel=1e-9, abs=1e-12)
    assert dual_norm(G, 2, method="gram") == pytest.approx(_ref_nuclear_2x2(G), rel=1e-6, abs=1e-9)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), shape=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       q=st.sampled_from(QS))
def test_hoelder_inequality_on_random_directions(seed, shape, q):
    """<G, A> <= ||G||_* ||A||_q for many random A (the other side of the sup)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal(shape)
    N = dual_norm(G, q)
    for _ in range(200):
        A = rng.standard_normal(shape) * rng.exponential(size=shape)
        assert float((G * A).sum()) <= N * matrix_norm(A, q) * (1 + 1e-12) + 1e-12


@settings(deadline=None, max_examples=40)
@given(A=matrices(max_side=4, max_value=10.0), q=st.sampled_from(QS))
def test_operator_norm_definition(A, q):
    assert matrix_norm(A, q) == pytest.approx(_ref_operator_norm(A, q), rel=1e-9, abs=1e-12)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), shape=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_spectral_norm_exact_upper_bound(seed, shape):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=g)
    exact = np.linalg.norm(A.double().numpy(), 2)
    s = spectral_norm(A)
    assert s == pytest.approx(exact, rel=1e-12)
    x = torch.randn(shape[1], 1, generator=g, dtype=torch.float64)
    for _ in range(30):  # power iteration only approaches from below
        x = A.double().T @ (A.double() @ x)
        x = x / x.norm()
    assert (A.double() @ x).norm().item() <= s * (1 + 1e-12)


def test_check_q_errors():
    for bad in (3, 0, -1, "foo", None, True, 1.5):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            duality_map(np.eye(2), bad)
    assert norms.check_q("inf") == math.inf and norms.check_q(2.0) == 2.0
    with pytest.raises(ValueError, match="'qr'"):
        duality_map(np.eye(2), 2, method="qr")
    with pytest.raises(ValueError, match="shape"):
        duality_map(np.zeros((2, 2, 2)), 2)


# ------------------------------------------------------------------------------------------
# Product spaces (F Prop. 4.6)
# ------------------------------------------------------------------------------------------


def blocks_strategy():
    elems = st.floats(-10, 10, allow_nan=False, width=64)
    shape = st.tuples(st.integers(1, 2), st.integers(1, 2))
    block = shape.flatmap(lambda s: hnp.arrays(np.float64, s, elements=elems))
    weight = st.floats(0.1, 10.0)
    return st.lists(st.tuples(block, weight), min_size=1, max_size=3)


@settings(deadline=None, max_examples=40)
@given(bw=blocks_strategy(), q=st.sampled_from(QS))
def test_product_dual_norm_and_duality_map(bw, q):
    ells = [b for b, _ in bw]
    p = [w for _, w in bw]
    N, i_star = product_dual_norm(ells, p, q)
    ratios = [dual_norm(e, q) / w for e, w in zip(ells, p)]
    assert N == pytest.approx(max(ratios)) and i_star == ratios.index(max(ratios))
    # sup over the product unit ball: its vertices are (0, .., u_i / p_i, .., 0), u_i a vertex of
    # block i's unit ball (q = 1, inf) -- brute force over them
    if q != 2:
        ref = max(_ref_dual_norm_polytope(e, q) / w for e, w in zip(ells, p))
        assert N == pytest.approx(ref, rel=1e-12, abs=1e-12)
    rho, N2, i2 = product_duality_map(ells, p, q)
    assert (N2, i2) == (N, i_star)
    assert all(np.count_nonzero(r) == 0 for i, r in enumerate(rho) if i != i_star)
    scale = max(N, 1e-300)
    assert abs(product_norm(rho, p, q) - N) <= TOL * scale                          # (4a)
    assert abs(sum(float((e * r).sum()) for e, r in zip(ells, rho)) - N * N) <= TOL * scale**2


def test_product_tie_breaking_and_errors():
    ells = [np.array([[2.0]]), np.array([[4.0]])]
    N, i = product_dual_norm(ells, [1.0, 2.0], 2)  # both ratios are 2: the first layer wins
    assert (N, i) == (2.0, 0)
    rho, _, _ = product_duality_map(ells, [1.0, 2.0], 2)
    assert rho[0][0, 0] == pytest.approx(2.0) and rho[1][0, 0] == 0.0
    with pytest.raises(ValueError, match="-1.0"):
        product_dual_norm(ells, [1.0, -1.0], 2)
    with pytest.raises(ValueError, match="2 blocks, 1 weights"):
        product_norm(ells, [1.0], 2)



@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-150, 1.0, 1e150, 1e250], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("shape", [(3, 4), (40, 50)], ids=["svd", "gram"])
def test_norms_are_scale_robust(scale, shape):
    """Every norm is positively homogeneous: ||s G|| = s ||G||, also where squaring s G would
    underflow (s = 1e-300: entries ~1e-300, squares 0) or overflow (s = 1e250) -- the Gram
    matrices are formed from G / max|G_ij| (hypothesis found q = 2 returning 0 at 5e-274)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=torch.float64)
    sG = G * scale
    for q in QS:
        assert matrix_norm(sG, q) == pytest.approx(scale * matrix_norm(G, q), rel=1e-12)
        for method in (["svd", "gram"] if q == 2 else ["auto"]):
            N = dual_norm(sG, q, method=method)
            assert N == pytest.approx(scale * dual_norm(G, q, method=method), rel=1e-9)
            rho, N2 = duality_map(sG, q, method=method)
            assert N2 == pytest.approx(N, rel=1e-12)
            assert matrix_norm(rho, q) == pytest.approx(N, rel=1e-6)             # F (4a)
            assert float((G * rho).sum()) == pytest.approx(N / scale * N, rel=1e-6)  # F (4b) / s
        assert product_norm([sG], [2.0], q) == pytest.approx(2 * scale * matrix_norm(G, q), rel=1e-12)
    assert spectral_norm(sG) > 0.0
