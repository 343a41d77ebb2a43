"""The functional-call helper (smoothchain.functional) against plain module calls.

Every reference is ``module(x)`` on a deep copy whose weights are loaded with
``torch.nn.utils.vector_to_parameters`` -- independent of the helper's flattening and of
``torch.func`` -- in float64, on an MLP, a CNN with BatchNorm2d (training and eval mode),
dropout, nested ``nn.Sequential`` and tied weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import smoothchain.estimators
from smoothchain.functional import FunctionalModule, flat_parameters, make_functional_call

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 2))


def _dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))


def _nested() -> nn.Module:
    return nn.Sequential(nn.Sequential(nn.Linear(4, 5), nn.ReLU()),
                         nn.Sequential(nn.Linear(5, 5, bias=False),
                                       nn.Sequential(nn.Tanh(), nn.Linear(5, 2))))


def _tied() -> nn.Module:
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    return nn.Sequential(a, nn.Tanh(), a, nn.Tanh(), b)


INPUTS = {"mlp": (6, 4), "cnn": (5, 2, 5, 5), "dropout": (6, 4), "nested": (6, 4), "tied": (6, 4)}
BUILD = {"mlp": _mlp, "cnn": _cnn, "dropout": _dropout, "nested": _nested, "tied": _tied}


def _case(name: str, seed: int = 0, train: bool = True):
    torch.manual_seed(seed)
    model = BUILD[name]().to(DT)
    if name == "cnn":  # non-trivial running statistics for the eval-mode case
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.train(train)
    x = torch.randn(*INPUTS[name], dtype=DT)
    w = flat_parameters(model) + 0.3 * torch.randn(flat_parameters(model).shape, dtype=DT)
    return model, x, w


def _reference(model: nn.Module, w: torch.Tensor, x: torch.Tensor, *, pure: bool) -> torch.Tensor:
    """model(x) with the weights w, on a deep copy; ``pure``: dropout in eval mode (the pure
    copy's convention; batch norm in training mode normalises with the batch statistics either
    way)."""
    ref = copy.deepcopy(model)
    vector_to_parameters(w, ref.parameters())
    if pure:
        for mod in ref.modules():
            if isinstance(mod, nn.Dropout):
                mod.eval()
    with torch.no_grad():
        return ref(x)


# --------------------------------------------------------------------------------------------
# Against plain module calls
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pure", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ["mlp", "cnn", "nested", "tied"])
def test_matches_plain_call(name, train, pure):
    model, x, w = _case(name, train=train)
    call = make_functional_call(model, pure=pure)
    expected = _reference(model, w, x, pure=pure)
    torch.testing.assert_close(call(w, x), expected, **TOL)


def test_dropout_pure_is_deterministic_and_the_identity():
    model, x, w = _case("dropout")
    call = make_functional_call(model, pure=True)
    out = call(w, x)
    torch.testing.assert_close(out, _reference(model, w, x, pure=True), **TOL)
    assert torch.equal(out, call(w, x))
    assert model[1].training  # the model's own dropout is untouched


def test_dropout_as_is_draws_like_the_module():
    model, x, w = _case("dropout")
    call = make_functional_call(model)
    torch.manual_seed(7)
    out = call(w, x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, _reference(model, w, x, pure=False), **TOL)


def test_as_is_updates_running_statistics_like_module_call():
    model, x, w = _case("cnn", train=True)
    ref = copy.deepcopy(model)
    vector_to_parameters(w, ref.parameters())
    with torch.no_grad():
        ref(x)
    make_functional_call(model)(w, x)
    assert torch.equal(model[1].running_mean, ref[1].running_mean)
    assert torch.equal(model[1].running_var, ref[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_pure_never_writes_and_ignores_later_changes():
    model, x, w = _case("cnn", train=True)
    state = copy.deepcopy(model.state_dict())
    call = make_functional_call(model, pure=True)
    out = call(w, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert isinstance(model[1], nn.BatchNorm2d) and model[1].training
    # eval mode: running statistics copied at construction, later changes do not leak in
    model.eval()
    call_eval = make_functional_call(model, pure=True)
    before = call_eval(w, x)
    model[1].running_mean.add_(5.0)
    torch.testing.assert_close(call_eval(w, x), before, rtol=0, atol=0)
    torch.testing.assert_close(call(w, x), out, rtol=0, atol=0)


def test_pure_shares_the_parameter_tensors():
    model, _, _ = _case("cnn")
    call = make_functional_call(model, pure=True)
    assert all(a is b for a, b in zip(call.module.parameters(), model.parameters()))
    assert call.names == tuple(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("train", [True, False])
def test_batch_statistics_override(train):
    model, x, w = _case("cnn", train=train)
    as_train, as_eval = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    torch.testing.assert_close(make_functional_call(model, pure=True, batch_statistics=True)(w, x),
                               _reference(as_train, w, x, pure=True), **TOL)
    torch.testing.assert_close(make_functional_call(model, pure=True, batch_statistics=False)(w, x),
                               _reference(as_eval, w, x, pure=True), **TOL)


def test_batch_norm_without_running_statistics_uses_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).to(DT).eval()
    x = torch.randn(7, 3, dtype=DT)
    w = flat_parameters(model)
    call = make_functional_call(model, pure=True)
    assert not isinstance(call.module[1], nn.BatchNorm1d)  # elementary-op version
    torch.testing.assert_close(call(w, x), _reference(model, w, x, pure=True), **TOL)
    with pytest.raises(ValueError, match="running statistics"):
        make_functional_call(model, pure=True, batch_statistics=False)


def test_batch_norm_used_twice_and_at_the_root():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.Tanh(), bn).to(DT)
    x = torch.randn(7, 3, dtype=DT)
    w = flat_parameters(model) + 0.1
    call = make_functional_call(model, pure=True)
    assert call.module[1] is call.module[3] and not isinstance(call.module[3], nn.BatchNorm1d)
    torch.testing.assert_close(call(w, x), _reference(model, w, x, pure=True), **TOL)
    root = nn.BatchNorm1d(4).to(DT)
    x4 = torch.randn(7, 4, dtype=DT)
    w4 = torch.randn(8, dtype=DT)
    torch.testing.assert_close(make_functional_call(root, pure=True)(w4, x4),
                               _reference(root, w4, x4, pure=True), **TOL)


@settings(max_examples=25)
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=5), batch=st.integers(2, 5),
       bias=st.booleans(), pure=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_random_mlps(widths, batch, bias, pure, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    model = nn.Sequential(*layers).to(DT)
    x = torch.randn(batch, widths[0], dtype=DT)
    w = torch.randn(parameters_to_vector(model.parameters()).shape, dtype=DT)
    call = make_functional_call(model, pure=pure)
    assert call.numel == w.numel()
    torch.testing.assert_close(call(w, x), _reference(model, w, x, pure=pure), **TOL)


# --------------------------------------------------------------------------------------------
# Parameter formats, flattening
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "nested", "tied"])
def test_flat_sequence_and_dict_agree(name):
    model, x, w = _case(name)
    call = make_functional_call(model, pure=True)
    tensors = call.unflatten(w)
    out = call(w, x)
    assert torch.equal(call(tensors, x), out)
    assert torch.equal(call(tuple(tensors), x), out)
    assert torch.equal(call(dict(zip(call.names, tensors)), x), out)


@pytest.mark.parametrize("name", ["mlp", "cnn", "nested", "tied"])
def test_unflatten_flatten_round_trip(name):
    model, _, w = _case(name)
    call = make_functional_call(model)
    params = list(model.parameters())
    assert call.names == tuple(n for n, _ in model.named_parameters())
    assert call.shapes == tuple(p.shape for p in params)
    assert call.sizes == tuple(p.numel() for p in params)
    assert call.numel == w.numel() == sum(call.sizes)
    assert torch.equal(call.flatten(call.unflatten(w)), w)
    assert torch.equal(call.flatten(dict(zip(call.names, call.unflatten(w)))), w)
    assert all(torch.equal(a, b.detach()) for a, b in zip(call.unflatten(call.flatten(params)), params))
    # the independent flattening of torch.nn.utils, and flat_parameters (detached copy)
    assert torch.equal(flat_parameters(model), parameters_to_vector(model.parameters()).detach())
    flat = flat_parameters(model)
    assert not flat.requires_grad
    flat.add_(1.0)
    assert not torch.equal(flat, flat_parameters(model))


def test_gradient_through_flat_vector_matches_autograd():
    model, x, w = _case("nested")
    call = make_functional_call(model)
    g = torch.func.grad(lambda v: call(v, x).pow(2).sum())(w)
    ref = copy.deepcopy(model)
    vector_to_parameters(w, ref.parameters())
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(g, parameters_to_vector(p.grad for p in ref.parameters()), **TOL)


def test_estimators_reexport():
    assert smoothchain.estimators.flat_parameters is flat_parameters
    model, x, w = _case("cnn", train=True)
    psi, w0 = smoothchain.estimators.functional_chain(model, x)
    assert torch.equal(w0, flat_parameters(model))
    torch.testing.assert_close(psi(w), _reference(model, w, x, pure=True).reshape(-1), **TOL)


def test_meta_tensors_for_shapes():
    model, x, _ = _case("cnn", train=False)
    call = make_functional_call(model)
    meta = {n: torch.empty(s, dtype=DT, device="meta") for n, s in zip(call.names, call.shapes)}
    buffers = {n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()}
    assert set(buffers) == set(call.buffer_names)
    out = call(meta, x.to("meta"), buffers=buffers)
    assert out.is_meta and out.shape == (x.shape[0], 2)
    pure = make_functional_call(model, pure=True, batch_statistics=True)
    assert pure.buffer_names == ()  # the batch norm's running statistics are gone
    assert pure(meta, x.to("meta")).shape == (x.shape[0], 2)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x), x


def test_errors():
    model, x, w = _case("mlp")
    call = make_functional_call(model)
    p = w.numel()
    wrong = rf"flat parameter vector of shape \({p},\), got \({p - 1},\).*0.weight \(6, 4\)"
    with pytest.raises(ValueError, match=wrong):
        call(w[:-1], x)
    with pytest.raises(ValueError, match="flat"):
        call(w[None], x)
    with pytest.raises(ValueError, match="flat"):
        call.unflatten(list(call.unflatten(w)))
    tensors = call.unflatten(w)
    with pytest.raises(ValueError, match="expected 4 parameter tensors, got 3"):
        call(tensors[:3], x)
    with pytest.raises(ValueError, match=r"'0.bias' must have shape \(6,\), got \(5,\)"):
        call([tensors[0], tensors[1][:5], *tensors[2:]], x)
    with pytest.raises(ValueError, match=r"missing \['2.bias'\], unexpected \['extra'\]"):
        call({**dict(zip(call.names[:3], tensors[:3])), "extra": tensors[3]}, x)
    with pytest.raises(TypeError, match="params must be"):
        call(3.0, x)
    with pytest.raises(TypeError, match="sequence or a mapping"):
        call.flatten(w)
    with pytest.raises(ValueError, match="unknown buffers"):
        call(w, x, buffers={"nope": torch.zeros(1)})
    with pytest.raises(TypeError, match="nn.Module"):
        make_functional_call(lambda x: x)
    with pytest.raises(ValueError, match="needs pure=True"):
        make_functional_call(model, batch_statistics=True)
    with pytest.raises(ValueError, match="batch_statistics must be"):
        make_functional_call(model, pure=True, batch_statistics="yes")
    tup = make_functional_call(_TupleOut().to(DT))
    with pytest.raises(TypeError, match="one tensor, got tuple"):
        tup(flat_parameters(tup.module), torch.randn(2, 3, dtype=DT))
    assert isinstance(call, FunctionalModule) and "numel=51" in repr(call)
