"""Tests of smoothchain.optim.CertifiedGD (certified-step gradient descent, RH Cor. 4.5 / Prop. 4.2
with the descent lemma) and of ``smoothchain train --optimizer certified-gd``.

* every step decreases F by at least its certified decrease eta ||g||^2 (1 - L_F eta / 2), up to
  a tiny rounding slack: seeded tanh / sigmoid / softplus MLPs and a softplus CNN with the
  cross-entropy, square, squared-error and autoencoder losses (float64), and random small MLPs
  (hypothesis);
* the step is the plain gradient step w - eta g with the reported eta (autograd), and eta is
  min(1/L_F, R / max_l ||g_l||) with L_F the certificate's;
* the squared error is certified as 2 x the "square" certificate (l2 halved);
* recertify_every = k > 1: every iterate stays in the ball of its last recertification, a
  certificate serves at most k steps, the ball forces early recertifications;
* state_dict round trip; errors (ReLU, bad radius, no closure, ...); a zero gradient;
* the train command and library with certified-gd, including an exact resume.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import FrozenInstanceError, asdict

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from smoothchain import certify  # noqa: E402
from smoothchain.checkpoint import read_checkpoint  # noqa: E402
from smoothchain.check import layer_blocks  # noqa: E402
from smoothchain.losses import loss_function, squared_error  # noqa: E402
from smoothchain.optim import CertifiedGD, CertifiedStep  # noqa: E402
from smoothchain.optim.certified_gd import (  # noqa: E402
    ball_step_limit, certificate_loss, certified_decrease, certified_step_size)

DT = torch.float64
ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": lambda: nn.Softplus(threshold=math.inf)}


def slack(rec: CertifiedStep) -> float:
    """Rounding allowance of actual >= certified: a few ulps of F (float64)."""
    return 1e-13 * max(1.0, abs(rec.loss_before))


def mlp(widths, act="tanh", seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = nn.Linear(a, b).to(DT)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=DT) / math.sqrt(a))
            lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=DT))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers)


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), ACTS["softplus"](), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(DT)


def batch(model, shape, loss, n, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn((n,) + tuple(shape), generator=g, dtype=DT)
    with torch.no_grad():
        out = model(x)
    if loss == "cross-entropy":
        return x, torch.randint(0, out.shape[-1], (n,), generator=g)
    if loss == "autoencoder":
        return x, None
    return x, torch.randn(out.shape, generator=g, dtype=DT)


CASES = [  # (name, model factory, input shape, loss, l2, radius)
    ("tanh-ce", lambda: mlp([5, 8, 3], "tanh", 1), (5,), "cross-entropy", 0.0, 0.1),
    ("tanh-square-l2", lambda: mlp([4, 6, 2], "tanh", 2), (4,), "square", 1e-2, 0.5),
    ("sigmoid-square", lambda: mlp([6, 7, 5, 2], "sigmoid", 3), (6,), "square", 0.0, 0.1),
    ("sigmoid-ce-l2", lambda: mlp([3, 9, 4], "sigmoid", 4), (3,), "cross-entropy", 1e-3, 1.0),
    ("softplus-ce", lambda: mlp([5, 6, 6, 3], "softplus", 5), (5,), "cross-entropy", 0.0, 0.1),
    ("softplus-ce-ball", lambda: mlp([5, 6, 3], "softplus", 6), (5,), "cross-entropy", 0.0, 1e-4),
    ("softplus-cnn-ce", lambda: cnn(7), (1, 6, 6), "cross-entropy", 0.0, 0.1),
    ("tanh-squared-error", lambda: mlp([4, 5, 3], "tanh", 8), (4,), "squared-error", 1e-3, 0.2),
    ("tanh-autoencoder", lambda: mlp([4, 3, 4], "tanh", 9), (4,), "autoencoder", 0.0, 0.1),
]


@pytest.mark.parametrize("mode", ["tight", "paper"])
@pytest.mark.parametrize("name, factory, shape, loss, l2, radius", CASES, ids=[c[0] for c in CASES])
def test_every_step_decreases_at_least_the_certified_amount(name, factory, shape, loss, l2, radius, mode):
    model = factory()
    x, y = batch(model, shape, loss, 7)
    opt = CertifiedGD(model, loss=loss, radius=radius, mode=mode, l2=l2)
    values = [float(opt.step(lambda: (x, y))) for _ in range(4)]
    assert len(opt.history) == 4
    for rec, value in zip(opt.history, values):
        assert rec.loss_before == value
        assert rec.certified_decrease > 0 and rec.recertified
        assert rec.actual_decrease >= rec.certified_decrease - slack(rec), rec
        assert rec.actual_decrease == rec.loss_before - rec.loss_after
        assert rec.eta == min(rec.inverse_smoothness, rec.ball_eta)
        assert rec.displacement <= radius * (1 + 1e-12)
    for a, b in zip(opt.history, opt.history[1:]):  # the same batch: F after = F before the next
        assert b.loss_before == pytest.approx(a.loss_after, rel=1e-14, abs=1e-15)
    if name.endswith("-ball"):  # R = 1e-4: the ball, not 1/L_F, limits the steps
        assert all(r.ball_eta < r.inverse_smoothness for r in opt.history)


_BATCH_CASES = [c for c in CASES if c[3] != "autoencoder"]  # local and segment need targets


@pytest.mark.parametrize("mode", ["local", "segment"])
@pytest.mark.parametrize("name, factory, shape, loss, l2, radius", _BATCH_CASES, ids=[c[0] for c in _BATCH_CASES])
def test_batch_certificates_decrease_at_least_the_certified_amount(name, factory, shape, loss, l2, radius, mode):
    """The modes that certify the step's batch itself: "local" (its ball) and "segment" (the
    step's own segment, docs/segment.md): the actual decrease is never below the certified one,
    and the segment's step is never shorter than the ball's 1/L_F."""
    model = factory()
    x, y = batch(model, shape, loss, 7)
    opt = CertifiedGD(model, loss=loss, radius=radius, mode=mode, l2=l2)
    for _ in range(4):
        opt.step(lambda: (x, y))
    for rec in opt.history:
        assert rec.certified_decrease > 0 and rec.recertified
        assert rec.actual_decrease >= rec.certified_decrease - slack(rec), rec
    if mode == "segment":
        ball = CertifiedGD(factory(), loss=loss, radius=radius, mode="local", l2=l2)
        ball.step(lambda: (x, y))
        assert opt.history[0].eta >= ball.history[0].inverse_smoothness
        assert all(r.reason == "segment" and r.ball_eta == math.inf for r in opt.history)
    else:
        assert opt.history[0].reason == "first" and all(r.reason in ("reused", "every") for r in opt.history[1:])


def test_a_local_certificate_serves_only_its_batch():
    model = mlp([5, 8, 3], "tanh", 1)
    x, y = batch(model, (5,), "cross-entropy", 7)
    opt = CertifiedGD(model, loss="cross-entropy", radius=0.5, mode="local", recertify_every=5)
    opt.step(lambda: (x, y))
    opt.step(lambda: (x, y))
    x2 = x.clone()
    x2[0, 0] *= 0.5  # smaller norm: a ball certificate would still serve it, a local one not
    opt.step(lambda: (x2, y))
    assert [r.reason for r in opt.history] == ["first", "reused", "batch"]


@settings(max_examples=25)
@given(widths=st.lists(st.integers(1, 5), min_size=2, max_size=4), act=st.sampled_from(sorted(ACTS)),
       loss=st.sampled_from(["cross-entropy", "square"]), n=st.integers(1, 5), seed=st.integers(0, 10_000),
       radius=st.sampled_from([1e-3, 0.05, 0.3, 1.0]), mode=st.sampled_from(["tight", "paper"]),
       k=st.integers(1, 3))
def test_random_mlps_decrease_at_least_the_certified_amount(widths, act, loss, n, seed, radius, mode, k):
    if loss == "cross-entropy" and widths[-1] < 2:
        widths = widths[:-1] + [2]
    model = mlp(widths, act, seed)
    x, y = batch(model, (widths[0],), loss, n, seed)
    opt = CertifiedGD(model, loss=loss, radius=radius, mode=mode, recertify_every=k)
    for _ in range(3):
        opt.step(lambda: (x, y))
    for rec in opt.history:
        assert rec.actual_decrease >= rec.certified_decrease - slack(rec), rec
        assert rec.certified_decrease >= 0 and rec.displacement <= radius * (1 + 1e-12)


def test_step_is_the_gradient_step_with_the_reported_eta_and_certificate():
    model = mlp([5, 7, 3], "tanh", 11)
    x, y = batch(model, (5,), "cross-entropy", 9)
    radius, l2 = 0.05, 1e-2
    opt = CertifiedGD(model, loss="cross-entropy", radius=radius, mode="tight", l2=l2)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        value = loss_function("cross-entropy", y, x)(model(x)) + 0.5 * l2 * sum((p * p).sum() for p in model.parameters())
        grads = torch.autograd.grad(value, list(model.parameters()))
        cert = certify(model, input_shape=(5,), batch_size=9, radius=radius, input_norm=float(x.norm()),
                       loss="cross-entropy", mode="tight", l2=l2, around_weights=True)
        out = opt.step(lambda: (x, y))
        rec = opt.history[-1]
        torch.testing.assert_close(out, value.detach(), rtol=1e-15, atol=0)
        assert rec.smoothness == cert.objective.smoothness
        assert rec.inverse_smoothness == 1 / cert.objective.smoothness
        blocks, _ = layer_blocks(model, (5,))
        g = torch.cat([gr.reshape(-1) for gr in grads])
        assert rec.ball_eta == pytest.approx(radius / max(float(g[b].norm()) for b in blocks), rel=1e-14)
        assert rec.grad_norm == pytest.approx(float(g.norm()), rel=1e-14)
        assert rec.certified_decrease == pytest.approx(
            rec.eta * rec.grad_norm ** 2 - cert.objective.smoothness * rec.eta ** 2 * rec.grad_norm ** 2 / 2, rel=1e-12)
        for p, b, gr in zip(model.parameters(), before, grads):
            torch.testing.assert_close(p.detach(), b - rec.eta * gr, rtol=1e-15, atol=1e-16)
        assert opt.last_certificate.objective.smoothness == rec.smoothness


def test_squared_error_is_certified_as_twice_the_square_loss():
    model = mlp([4, 6, 3], "sigmoid", 12)
    x, y = batch(model, (4,), "square", 8)
    assert torch.allclose(squared_error(model(x), y), 2 * loss_function("square", y)(model(x)), rtol=1e-14)
    assert certificate_loss("squared-error") == ("square", 2.0)
    assert certificate_loss("mse") == ("square", 2.0) and certificate_loss("square") == ("square", 1.0)
    l2, radius = 0.02, 0.1
    opt = CertifiedGD(model, loss="squared-error", radius=radius, l2=l2, mode="tight")
    target = float(y.reshape(8, -1).norm(dim=1).max())
    sq = certify(model, input_shape=(4,), batch_size=8, radius=radius, input_norm=float(x.norm()), loss="square",
                 mode="tight", l2=l2 / 2, around_weights=True, target_norm=target)
    plain = certify(model, input_shape=(4,), batch_size=8, radius=radius, input_norm=float(x.norm()),
                    loss="square", mode="tight", l2=0.0, around_weights=True, target_norm=target)
    value = opt.step(lambda: (x, y))
    rec = opt.history[-1]
    assert rec.smoothness == 2 * sq.objective.smoothness
    assert rec.smoothness == pytest.approx(2 * plain.objective.smoothness + l2, rel=1e-14)
    assert float(value) == rec.loss_before
    assert rec.actual_decrease >= rec.certified_decrease - slack(rec)


@pytest.mark.parametrize("k, radius, must, never", [
    (5, 0.1, {"reused", "every"}, {"ball"}),          # 1/L_F steps: k of them fit in the ball
    (5, 0.05, {"reused", "ball", "every"}, set()),    # 4-5 steps fit: the ball recertifies early
    (3, 0.03, {"reused", "ball"}, set()),             # 1-3 steps fit
    (3, 0.003, {"ball"}, {"reused", "every"}),        # ball-limited steps end on the sphere
])
def test_recertify_every_k_stays_in_the_certified_ball(k, radius, must, never):
    model = mlp([4, 6, 3], "tanh", 13)
    x, y = batch(model, (4,), "cross-entropy", 6)
    blocks, _ = layer_blocks(model, (4,))
    opt = CertifiedGD(model, loss="cross-entropy", radius=radius, recertify_every=k)
    centre, since, reasons = None, 0, []
    for _ in range(14):
        w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
        opt.step(lambda: (x, y))
        rec = opt.history[-1]
        reasons.append(rec.reason)
        if rec.recertified:
            centre, since = w0, 0
        since += 1
        assert since <= k
        w1 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        for b in blocks:  # both ends of the segment, hence all of it (C is convex), are in C
            assert float((w0[b] - centre[b]).norm()) <= radius * (1 + 1e-12)
            assert float((w1[b] - centre[b]).norm()) <= radius * (1 + 1e-12)
        assert rec.displacement == pytest.approx(max(float((w1[b] - centre[b]).norm()) for b in blocks), rel=1e-12)
        assert rec.actual_decrease >= rec.certified_decrease - slack(rec)
        assert rec.eta == min(rec.inverse_smoothness, rec.ball_eta)
    assert reasons[0] == "first" and must <= set(reasons) and not never & set(reasons), reasons


def test_a_new_batch_that_does_not_fit_the_certificate_recertifies():
    model = mlp([4, 5, 3], "tanh", 14)
    x, y = batch(model, (4,), "cross-entropy", 6)
    opt = CertifiedGD(model, loss="cross-entropy", radius=0.1, recertify_every=10)
    opt.step(lambda: (x, y))
    opt.step(lambda: (0.5 * x, y))      # smaller ||x||: the certificate still holds
    assert opt.history[-1].reason == "reused"
    opt.step(lambda: (2 * x, y))        # larger ||x||
    assert opt.history[-1].reason == "batch"
    opt.step(lambda: (x[:3], y[:3]))    # another batch size
    assert opt.history[-1].reason == "batch"
    opt.param_groups[0]["radius"] = 0.05
    opt.step(lambda: (x[:3], y[:3]))
    assert opt.history[-1].reason == "settings"
    with torch.no_grad():               # weights moved out of the ball by someone else
        for p in model.parameters():
            p.add_(1.0)
    opt.step(lambda: (x[:3], y[:3]))
    assert opt.history[-1].reason == "ball"


def test_state_dict_round_trip_continues_identically():
    model = mlp([4, 6, 3], "softplus", 15)
    x, y = batch(model, (4,), "cross-entropy", 6)
    opt = CertifiedGD(model, loss="cross-entropy", radius=0.01, recertify_every=3)
    for _ in range(4):
        opt.step(lambda: (x, y))
    sd = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = CertifiedGD(twin, loss="cross-entropy", radius=0.5, recertify_every=1)
    opt2.load_state_dict(sd)
    assert opt2.history == opt.history and opt2.param_groups[0]["recertify_every"] == 3
    assert opt2.param_groups[0]["radius"] == 0.01
    assert [asdict(r) for r in opt2.history] == sd["certified_gd"]["history"]
    for _ in range(3):
        opt.step(lambda: (x, y))
        opt2.step(lambda: (x, y))
    assert [r.step for r in opt2.history] == list(range(1, 8))
    strip = lambda h: [{**asdict(r), "certify_seconds": 0.0} for r in h]  # noqa: E731
    assert strip(opt2.history) == strip(opt.history)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    torch.save(opt.state_dict(), __import__("io").BytesIO())  # checkpoints are torch.save-able


def test_float32_model_logs_float64_losses():
    """A float32 model steps in float32; F before and after are evaluated in float64."""
    model = mlp([4, 5, 3], "tanh", 20).to(torch.float32)
    x, y = batch(model.to(DT), (4,), "cross-entropy", 6)
    model = model.to(torch.float32)
    x32 = x.to(torch.float32)
    x = x32.to(DT)  # the batch the optimizer sees, exactly
    opt = CertifiedGD(model, loss="cross-entropy", radius=0.1)
    ref = loss_function("cross-entropy", y, x)(copy.deepcopy(model).to(DT)(x)).item()
    value = opt.step(lambda: (x32, y))
    rec = opt.history[-1]
    assert value.dtype == DT and rec.loss_before == pytest.approx(ref, rel=1e-15)
    after = loss_function("cross-entropy", y, x)(copy.deepcopy(model).to(DT)(x)).item()
    assert rec.loss_after == pytest.approx(after, rel=1e-15)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert rec.actual_decrease > 0


def test_records_are_frozen():
    model = mlp([3, 4, 2], "tanh", 16)
    x, y = batch(model, (3,), "cross-entropy", 4)
    opt = CertifiedGD(model)
    opt.step(lambda: (x, y))
    with pytest.raises(FrozenInstanceError):
        opt.history[-1].eta = 1.0


def test_zero_gradient_moves_nothing():
    model = mlp([3, 4, 2], "tanh", 17)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.randn(5, 3, dtype=DT)
    y = torch.zeros(5, 2, dtype=DT)       # output 0 = target: F = 0, grad F = 0
    opt = CertifiedGD(model, loss="square", radius=0.1)
    opt.step(lambda: (x, y))
    rec = opt.history[-1]
    assert rec.grad_norm == 0 and rec.ball_eta == math.inf and rec.eta == rec.inverse_smoothness
    assert rec.certified_decrease == 0 and rec.actual_decrease == 0
    assert all(float(p.detach().abs().max()) == 0 for p in model.parameters())


def test_functional_pieces():
    assert certified_step_size(4.0, 1.0) == 0.25 and certified_step_size(4.0, 0.1) == 0.1
    assert certified_step_size(0.0, 0.3) == 0.3
    with pytest.raises(ValueError):
        certified_step_size(math.inf, 1.0)
    assert certified_decrease(0.25, 2.0, 4.0) == pytest.approx(0.25)
    assert certified_decrease(0.0, 2.0, 4.0) == 0 and certified_decrease(1.0, 0.0, 4.0) == 0
    g = torch.tensor([3.0, 4.0, 1.0], dtype=DT)
    blocks = [slice(0, 2), slice(2, 3), slice(3, 3)]
    assert ball_step_limit(None, g, blocks, 1.0) == pytest.approx(0.2)
    a = torch.tensor([0.3, 0.0, 0.0], dtype=DT)
    t = ball_step_limit(a, g, blocks, 1.0)
    assert float((a[:2] - t * g[:2]).norm()) == pytest.approx(1.0) and t > 0.2
    assert ball_step_limit(-a, g, blocks, 1.0) < 0.2
    assert ball_step_limit(torch.tensor([2.0, 0, 0], dtype=DT), g, blocks, 1.0) == 0.0
    assert ball_step_limit(None, torch.zeros(3, dtype=DT), blocks, 1.0) == math.inf


def test_errors():
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"L_F of the objective is inf.*relu in layer .0. is not C\^1"):
        CertifiedGD(relu).step(lambda: (x, y))
    model = mlp([3, 4, 2], "tanh", 18)
    for bad in (0, -1.0, math.nan, math.inf, "0.1", None, True):
        with pytest.raises(ValueError, match="radius"):
            CertifiedGD(model, radius=bad)
    opt = CertifiedGD(model)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match=r"\(x, y\)"):
        opt.step(lambda: torch.tensor(1.0))
    with pytest.raises(ValueError, match="radius"):
        opt.param_groups[0]["radius"] = -1.0
        opt.step(lambda: (x, y))
    for kw in (dict(recertify_every=0), dict(recertify_every=1.5), dict(l2=-1.0), dict(loss="hinge")):
        with pytest.raises(ValueError):
            CertifiedGD(model, **kw)
    with pytest.raises(TypeError):
        CertifiedGD([torch.zeros(2)])
    with pytest.raises(ValueError, match="constants mode"):
        CertifiedGD(model, mode="no-such-mode").step(lambda: (x, y))
    with pytest.raises(ValueError, match="group"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})


def test_a_custom_certifier_is_used():
    model = mlp([3, 4, 2], "tanh", 19)
    x, y = batch(model, (3,), "square", 4)
    calls = []

    def certifier(m, xb, yb, *, loss, radius, mode, l2):
        calls.append((loss, radius, mode, l2))
        return certify(m, input_shape=xb.shape[1:], batch_size=len(xb), radius=radius, input_norm=float(xb.norm()),
                       loss=loss, mode="tight", l2=l2, around_weights=True,
                       target_norm=float(yb.reshape(len(yb), -1).norm(dim=1).max()))

    opt = CertifiedGD(model, loss="squared-error", radius=0.2, mode="someone-elses-mode", l2=0.1,
                      certifier=certifier)
    opt.step(lambda: (x, y))
    assert calls == [("square", 0.2, "someone-elses-mode", 0.05)]
    assert opt.history[-1].actual_decrease >= opt.history[-1].certified_decrease - slack(opt.history[-1])


# --------------------------------------------------------------------------------------------
# smoothchain train --optimizer certified-gd
@pytest.fixture(scope="module")
def digits():
    from smoothchain.train import load_data

    pytest.importorskip("sklearn")
    return load_data("digits", limit=60, dtype=DT)


def test_train_certified_gd_library_and_resume(tmp_path, digits):
    from smoothchain.train import TrainConfig, train

    common = dict(optimizer="certified-gd", hidden=6, steps=7, batch_size=0, checkpoint_every=3,
                  eval_every=3, dtype="float64", plots=False, radius=0.05)
    out = {}
    summary = train(TrainConfig(out=str(tmp_path / "full"), **common), data=digits, progress=False, metrics_out=out)
    assert summary["radius"] == 0.05 and summary["steps"] == 7
    recs = out["metrics"]
    assert all(b["loss"] <= a["loss"] for a, b in zip(recs, recs[1:]))
    for r in recs:
        c = r["certified"]
        assert c["actual_decrease"] >= c["certified_decrease"] - 1e-13 * max(1.0, r["loss"])
    # the loss column is F's objective (eq. 21) before the step
    train(TrainConfig(out=str(tmp_path / "part"), **common), data=digits, progress=False, stop_after=4)
    train(TrainConfig(out=str(tmp_path / "part"), resume=True, **common), data=digits, progress=False)
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in part] == [json.loads(line)["loss"] for line in full]
    ck_full = read_checkpoint(tmp_path / "full" / "checkpoint.pt")
    ck_part = read_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for k, v in ck_full["model"].items():
        assert torch.equal(v, ck_part["model"][k])
    with pytest.raises(ValueError, match="radius"):
        train(TrainConfig(**{**common, "radius": 0.0}), data=digits, progress=False)


def test_train_squared_error_certificate_scaling(digits):
    """make_optimizer's certificate for F's squared error = 2 x the "square" certificate."""
    from smoothchain.train import build_model, make_optimizer

    x = digits.x_train.reshape(len(digits.x_train), -1)
    z = digits.y_train.to(DT)
    model = build_model(x.shape[1], 5, z.shape[1], seed=0, dtype=DT)
    opt = make_optimizer("certified-gd", model, 2.0, 1.0, radius=0.05, certify="tight")
    sq = certify(model, input_shape=(x.shape[1],), batch_size=len(x), radius=0.05, input_norm=float(x.norm()),
                 loss="square", mode="tight", around_weights=True,
                 target_norm=float(z.norm(dim=1).max()))
    with torch.no_grad():
        before = float(squared_error(model(x), z))  # the run's objective, F eq. 21
    value = opt.step(lambda: (x, z))
    assert float(value) == pytest.approx(before, rel=1e-14)
    assert opt.history[-1].smoothness == 2 * sq.objective.smoothness


def test_cli_train_certified_gd(tmp_path, capsys):
    from smoothchain import cli

    pytest.importorskip("sklearn")
    rc = cli.main(["train", "--optimizer", "certified-gd", "--data", "digits", "--limit", "50", "--hidden", "4",
                   "--steps", "3", "--radius", "0.2", "--eval-every", "3", "--out", str(tmp_path), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["optimizer"] == "certified-gd" and doc["steps"] == 3 and doc["radius"] == 0.2
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[-1]["loss"] < recs[0]["loss"]
    assert {"training_error.png", "checkpoint.pt", "summary.json"} <= {p.name for p in tmp_path.iterdir()}
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(SystemExit):
            cli.main(["train", "--optimizer", "certified-gd", "--radius", bad])
