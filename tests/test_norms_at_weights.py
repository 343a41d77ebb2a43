"""The exact norms of bi-affine components at their weights (``tight`` balls around the weights,
docs/tight-constants.md "Around the weights"): never below the operator norm of the dense
matrix built the slow way, and each of the convolution's three bounds attacked separately."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smoothchain.components import Conv2d, Linear, conv_operator_bound  # noqa: E402

DT = torch.float64


def dense_conv_norm(W, shape, stride, padding, dilation) -> float:
    """Spectral norm of the convolution's matrix, column by column from the basis images."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=DT).reshape((n,) + tuple(shape))
    cols = torch.nn.functional.conv2d(basis, W, None, stride, padding, dilation).reshape(n, -1)
    return float(torch.linalg.matrix_norm(cols.T, ord=2))


@settings(max_examples=60, deadline=None)
@given(c_in=st.integers(1, 3), c_out=st.integers(1, 3), k=st.integers(1, 3), hw=st.integers(3, 7),
       stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       seed=st.integers(0, 10_000), grid=st.sampled_from([8, 16, 64]))
def test_conv_operator_bound_is_sound(c_in, c_out, k, hw, stride, padding, dilation, seed, grid):
    if (k - 1) * dilation + 1 > hw + 2 * padding:
        return
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c_out, c_in, k, k, generator=g, dtype=DT)
    shape = (c_in, hw, hw)
    exact = dense_conv_norm(W, shape, stride, padding, dilation)
    comp = Conv2d(c_in, c_out, (k, k), (stride, stride), (padding, padding), (dilation, dilation))
    mu_root = math.sqrt(comp.multiplicity(shape))
    per_offset = float(torch.linalg.matrix_norm(W.permute(2, 3, 0, 1), ord=2).sum())
    # each bound alone, then the least of them
    assert exact <= per_offset * (1 + 1e-12)
    assert exact <= mu_root * float(W.norm()) * (1 + 1e-12)
    assert exact <= conv_operator_bound(W, (dilation, dilation), None, grid=grid) * (1 + 1e-12)
    bound = comp.weight_norms_at(W, None, shape, 2).input_operator
    assert exact <= bound <= min(per_offset, mu_root * float(W.norm())) * (1 + 1e-8)


def test_symbol_bound_is_close_for_a_stride_one_conv_on_a_large_image():
    """Sharpness: on a 24x24 image with padding 1 the exact norm approaches the symbol's sup."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 2, 3, 3, generator=g, dtype=DT)
    exact = dense_conv_norm(W, (2, 24, 24), 1, 1, 1)
    bound = conv_operator_bound(W, (1, 1), None)  # the default 128 x 128 sample of the torus
    assert exact <= bound <= 1.1 * exact


def test_linear_norms_at_weights_are_exact():
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(5, 7, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    norms = Linear(7, 5).weight_norms_at(W, b, (3, 7), batch_size=4)  # 4 examples x 3 positions
    assert norms.input_operator == pytest.approx(float(torch.linalg.svdvals(W)[0]), rel=1e-8)
    assert norms.offset == pytest.approx(math.sqrt(12) * float(b.norm()), rel=1e-8)
