"""Tests of smoothchain.optim.GaussNewton and Newton (RH eqs. (13)-(14) as torch optimizers).

* the update is w <- w + the oracle's direction, the returned value is F(w_t) before the step
  (both against direct computations);
* training on the built-in digits data (smoothchain.data.digits) decreases the loss with each
  optimizer (small MLP, a few full-batch steps on a subset);
* state_dict round trip; bad input raises.
"""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from smoothchain.optim import DSGD, GaussNewton, Newton  # noqa: E402
from smoothchain.oracles import gauss_newton_step, newton_step  # noqa: E402

DT = torch.float64



@pytest.fixture(scope="module")
def digits_batch():
    data = pytest.importorskip("smoothchain.data")
    pytest.importorskip("sklearn")
    ds = data.digits(dtype=DT)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(ds.x_train.shape[0], generator=gen)[:16]
    return ds.x_train[idx], ds.labels_train[idx], ds.y_train[idx]


def small_mlp(seed=0, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(DT)


@pytest.mark.parametrize("opt_cls, loss, method, gamma, l2, factor", [
    (GaussNewton, "cross-entropy", "dual", 4.0, 1e-3, 0.7),
    (GaussNewton, "square", "dp", 10.0, 0.0, 0.3),
    (Newton, "cross-entropy", "dp", 1.0, 1e-3, 0.85),
    (Newton, "square", "dp", 2.0, 1e-3, 0.5),
])
def test_training_on_digits_decreases_the_loss(digits_batch, opt_cls, loss, method, gamma, l2, factor):
    """3 full-batch steps on 16 digits: the objective decreases monotonically, by ``factor``."""
    x, labels, onehot = digits_batch
    y = labels if loss == "cross-entropy" else onehot
    model = small_mlp()
    opt = opt_cls(model, loss=loss, gamma=gamma, l2=l2, method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # CG at its q-iteration cap (dual.py)
        values = [float(opt.step(lambda: (x, y))) for _ in range(3)]
    final = float(opt._objective(x, y, loss, l2))
    assert final < factor * values[0], values + [final]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:] + [final])), values + [final]
    assert opt.last_result is not None and opt.last_gamma == opt.last_result.gamma
    if opt_cls is GaussNewton and method == "dual":
        assert opt.last_result.oracle_calls <= 2 * y.shape[0] * 10 + 1


@pytest.mark.parametrize("opt_cls, oracle", [(GaussNewton, gauss_newton_step), (Newton, newton_step)])
def test_step_applies_the_oracle_direction_and_returns_the_value_before(opt_cls, oracle):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    l2, gamma = 0.05, 0.8
    before = [p.detach().clone() for p in model.parameters()]
    ref = oracle(model, x, y, loss="square", l2=l2, gamma=gamma)
    value_ref = 0.5 * ((model(x) - y) ** 2).sum() / 5 + 0.5 * l2 * sum((p ** 2).sum() for p in before)
    opt = opt_cls(model, loss="square", gamma=gamma, l2=l2)
    value = opt.step(lambda: (x, y))
    assert value.dim() == 0 and not value.requires_grad
    torch.testing.assert_close(value, value_ref.detach(), rtol=1e-14, atol=0)
    for p, b, d in zip(model.parameters(), before, ref.direction):
        torch.testing.assert_close(p.detach(), b + d, rtol=1e-12, atol=1e-14)
    assert opt.last_gamma == ref.gamma
    assert opt.state[next(iter(model.parameters()))]["step"] == 1


def test_newton_reports_a_halved_gamma():
    """A huge gamma on a non-convex problem: Algo. 4 halves it; last_gamma says so."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    x, y = torch.randn(4, 2, dtype=DT), 5 * torch.randn(4, 2, dtype=DT)
    opt = Newton(model, loss="square", gamma=1e6)
    opt.step(lambda: (x, y))
    assert not opt.last_result.feasible and opt.last_gamma < 1e6
    assert opt.param_groups[0]["gamma"] == 1e6    # requested afresh at the next step


def test_autoencoder_training_decreases_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6)).to(DT)
    x = torch.rand(16, 6, dtype=DT)
    opt = GaussNewton(model, loss="autoencoder", gamma=1.0)
    values = [float(opt.step(lambda: (x, None))) for _ in range(3)]
    assert values[-1] < values[0]


def test_state_dict_round_trip(digits_batch):
    x, labels, _ = digits_batch
    model_a = small_mlp(1)
    model_b = small_mlp(1)
    opt_a = GaussNewton(model_a, loss="cross-entropy", gamma=0.5, l2=1e-3, method="dp")
    opt_a.step(lambda: (x, labels))
    opt_b = GaussNewton(model_b, loss="square", gamma=3.0, l2=0.0, method="dual")
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    group = opt_b.param_groups[0]
    assert (group["gamma"], group["l2"], group["loss"], group["method"]) == (0.5, 1e-3, "cross-entropy", "dp")
    assert opt_b.state[next(iter(model_b.parameters()))]["step"] == 1
    va, vb = opt_a.step(lambda: (x, labels)), opt_b.step(lambda: (x, labels))
    torch.testing.assert_close(va, vb, rtol=0, atol=0)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    newton = Newton(small_mlp(1), gamma=0.25)
    newton2 = Newton(small_mlp(1))
    newton2.load_state_dict(newton.state_dict())
    assert newton2.param_groups[0]["gamma"] == 0.25


@pytest.mark.parametrize("opt_cls", [GaussNewton, Newton])
def test_bad_input(opt_cls):
    model = nn.Sequential(nn.Linear(2, 2)).to(DT)
    x, y = torch.randn(3, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    with pytest.raises(TypeError, match="nn.Module"):
        opt_cls([torch.zeros(2)])
    for kwargs, match in [(dict(gamma=0.0), "gamma"), (dict(gamma=math.inf), "gamma"),
                          (dict(gamma="big"), "gamma"), (dict(l2=-1.0), "l2"),
                          (dict(loss="hinge"), "loss"), (dict(loss="convex-clustering"), "Hessian"),
                          (dict(method="sgd"), "method")]:
        with pytest.raises(ValueError, match=match):
            opt_cls(model, **kwargs)
    with pytest.raises(ValueError, match="no parameters"):
        opt_cls(nn.Sequential(nn.Tanh()))
    opt = opt_cls(model)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="batch"):
        opt.step(lambda: x)
    with pytest.raises(ValueError, match="square loss"):
        opt.step(lambda: (x, y[:, :1]))
    with pytest.raises(ValueError, match="one group"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    opt.param_groups[0]["gamma"] = -1.0
    with pytest.raises(ValueError, match="gamma"):
        opt.step(lambda: (x, y))
    assert DSGD is not None   # still exported next to the new optimizers
