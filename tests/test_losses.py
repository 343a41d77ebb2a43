"""The loss table (smoothchain.losses) against losses written independently with PyTorch's own
functions, and F's (d_{q,1}, d_{q,2}) against brute force over the box they are taken on."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as tF  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smoothchain.losses import (  # noqa: E402
    LOSSES,
    f_loss_constants,
    get_loss,
    loss_function,
    loss_names,
)

DT = torch.float64


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_values_match_pytorch(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, k, generator=g, dtype=DT)
    labels = torch.randint(0, k, (m,), generator=g)
    probs = torch.softmax(torch.randn(m, k, generator=g, dtype=DT), dim=-1)
    y = torch.randn(m, k, generator=g, dtype=DT)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    close(loss_function("cross-entropy", labels)(z), tF.cross_entropy(z, labels))
    close(loss_function("cross-entropy", probs)(z), tF.cross_entropy(z, probs))
    close(loss_function("square", y)(z), tF.mse_loss(z, y, reduction="sum") / (2 * m))
    close(loss_function("autoencoder", None, y)(z), tF.mse_loss(z, y, reduction="sum") / (2 * m))
    close(loss_function("squared-error", y)(z), tF.mse_loss(z, y, reduction="sum") / m)
    close(loss_function("mse", y)(z), loss_function("squared-error", y)(z))
    # the square rows' scale s: f = (s/m) sum ||z_i - y_i||^2
    for name in loss_names(square=True, reads=("targets",)):
        s = get_loss(name).square_scale
        close(loss_function(name, y)(z), s * (z - y).pow(2).sum() / m)


def test_cross_entropy_gradient_through_torch_func():
    """The one-hot targets are built outside f: torch.func's grad and jvp-of-grad run through it."""
    z = torch.randn(4, 3, dtype=DT)
    y = torch.tensor([0, 2, 1, 2])
    f = loss_function("cross-entropy", y)
    ref = torch.func.grad(lambda t: tF.cross_entropy(t, y))(z)
    torch.testing.assert_close(torch.func.grad(f)(z), ref, rtol=1e-12, atol=1e-12)
    u = torch.randn_like(z)
    hvp = torch.func.jvp(torch.func.grad(f), (z,), (u,))[1]
    p = torch.softmax(z, -1)
    ref_hvp = (p * u - p * (p * u).sum(-1, keepdim=True)) / z.shape[0]
    torch.testing.assert_close(hvp, ref_hvp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", [1.0, 1.5, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("n, D", [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_f_constants_by_brute_force(q, n, D):
    """d_{q,1} = sup ||2(y - z)||_{q'} over |y_k| <= 1, |z_k| <= D (attained at corners);
    d_{q,2} = ||2 I||_{q -> q'} = sup_{||u||_q = 1} ||2u||_{q'} (attained at the all-ones
    direction when q' <= q, at a basis vector otherwise)."""
    d1, d2 = f_loss_constants(n, q, D)
    dual = 1.0 if q == math.inf else (math.inf if q == 1 else q / (q - 1))
    corner = torch.full((n,), 2.0 * (1 + D), dtype=DT)
    assert d1 == pytest.approx(float(torch.linalg.vector_norm(corner, ord=dual)), rel=1e-12)
    cands = [torch.ones(n, dtype=DT), torch.eye(n, dtype=DT)[0]]
    best = max(float(torch.linalg.vector_norm(2 * u, ord=dual) / torch.linalg.vector_norm(u, ord=q))
               for u in cands)
    assert d2 == pytest.approx(best, rel=1e-12)


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="loss must be one of"):
        get_loss("hinge")
    with pytest.raises(ValueError, match="needs targets"):
        loss_function("square")
    with pytest.raises(ValueError, match="inputs"):
        loss_function("autoencoder")
    with pytest.raises(ValueError, match="no F constants"):
        f_loss_constants(3, 2.0, loss="cross-entropy")
    with pytest.raises(ValueError, match="q must be"):
        f_loss_constants(3, 0.5)
    assert set(loss_names(certified=True)) == {n for n, r in LOSSES.items() if r.rh_constants}
