"""Hessian-vector products with the data's convolutions routed by ``data_conv.DataConvolutions``
against the dense Hessian (torch.func.hessian, float64), over convolution configurations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from smoothchain import data_conv
from smoothchain.estimators import _hvp, flat_parameters, objective

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _model(d: int, stride: int, padding: int, dilation: int, groups: int, bias: bool, second: bool) -> nn.Module:
    c_in, c_mid = 2 * groups, 2 * groups
    layers = [CONV[d](c_in, c_mid, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias),
              nn.Tanh()]
    if second:  # a convolution whose input needs a gradient: not routed
        layers += [CONV[d](c_mid, 3, 2, bias=bias), nn.Softplus()]
    return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(3))


@settings(max_examples=25, deadline=None)
@given(d=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), bias=st.booleans(), second=st.booleans(), seed=st.integers(0, 2**16))
def test_hessian_vector_product_matches_dense(d, stride, padding, dilation, groups, bias, second, seed):
    torch.manual_seed(seed)
    size = max({1: 9, 2: 7, 3: 6}[d], stride + 2 * dilation + 1)  # the first output is >= 2 wide
    x = torch.randn(3, 2 * groups, *([size] * d), dtype=torch.float64)
    model = _model(d, stride, padding, dilation, groups, bias, second).double()
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 3, (3,))
    F = objective(model, x, y)
    w = flat_parameters(model)
    H = torch.func.hessian(F)(w)
    v = torch.randn(w.shape, dtype=torch.float64)
    torch.testing.assert_close(_hvp(F, w)(v), H @ v, rtol=1e-9, atol=1e-12)


def test_the_data_convolution_is_routed_and_the_others_are_not(monkeypatch):
    calls = []
    inner = data_conv._DataConvolution.forward

    def spy(ctx, x, weight, *rest):
        calls.append(tuple(weight.shape))
        return inner(ctx, x, weight, *rest)

    monkeypatch.setattr(data_conv._DataConvolution, "forward", staticmethod(spy))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    x = torch.randn(4, 1, 7, 7)
    _hvp(objective(model, x, torch.randint(0, 2, (4,))), flat_parameters(model))
    assert calls == [(2, 1, 3, 3)]  # the first (data) convolution only


def test_outside_an_autograd_recording_nothing_changes():
    x = torch.randn(2, 1, 5, 5)
    conv = nn.Conv2d(1, 2, 3)
    with data_conv.DataConvolutions():
        out = conv(x)
        same = conv(x.requires_grad_())  # input needs a gradient: the default path
    torch.testing.assert_close(out, nn.functional.conv2d(x, conv.weight, conv.bias))
    assert same.grad_fn is not None and "Convolution" in type(same.grad_fn).__name__


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_takes_the_default_path(padding):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(1, 2, 3, padding=padding), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(3, 1, 8, dtype=torch.float64)
    model(x)
    F = objective(model, x, torch.randint(0, 2, (3,)))
    w = flat_parameters(model)
    v = torch.randn(w.shape, dtype=torch.float64)
    torch.testing.assert_close(_hvp(F, w)(v), torch.func.hessian(F)(w) @ v, rtol=1e-9, atol=1e-12)
