"""Convolutions of the data for reverse-over-reverse Hessian-vector products.

A Hessian-vector product by double backward (``estimators._hvp``) differentiates each
convolution's weight gradient ``g_W = corr(x, g_out)`` again.  PyTorch's double backward of a
convolution computes the gradient with respect to the convolution's *input* as well, needed or
not; for the first layer, whose input is the data, that is a transposed convolution onto the
images, the single most expensive operation of the product (13 of 36 ms of a LeNet-5 product at
batch 128 on one CPU thread).

:class:`DataConvolutions`, a ``TorchFunctionMode``, routes the convolutions whose input needs
no gradient through :class:`_DataConvolution`, whose backward is the weight gradient alone, as a
function whose own derivative is its adjoint ``ggW -> conv(x, ggW)`` (one forward convolution):
the same products, without the unneeded one.  Plain autograd only (no torch.func transforms);
``estimators._hvp`` falls back to the default path if the forward fails under it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

#: the functional convolutions routed, and their spatial dimension
_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _expand(value, d: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * d


class _WeightGradient(torch.autograd.Function):
    """``g_out -> g_W = corr(x, g_out)`` for fixed data ``x``; backward: its adjoint ``conv(x, .)``."""

    @staticmethod
    def forward(ctx, g_out, x, weight_shape, conv, conf):
        ctx.x, ctx.conv, ctx.conf = x, conv, conf
        stride, padding, dilation, groups = conf
        shape_only = g_out.new_empty(1).expand(weight_shape)  # only its shape is read
        return torch.ops.aten.convolution_backward(
            g_out, x, shape_only, None, stride, padding, dilation, False, [0] * (x.dim() - 2), groups,
            (False, True, False))[1]

    @staticmethod
    def backward(ctx, gg_weight):
        stride, padding, dilation, groups = ctx.conf
        return ctx.conv(ctx.x, gg_weight, None, stride, padding, dilation, groups), None, None, None, None


class _DataConvolution(torch.autograd.Function):
    """``conv(x, W, b)`` for data ``x`` that needs no gradient; backward: gradients of W and b only,
    as differentiable functions of the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv, conf):
        ctx.x, ctx.weight_shape, ctx.conv, ctx.conf, ctx.has_bias = x, weight.shape, conv, conf, bias is not None
        stride, padding, dilation, groups = conf
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g_out):
        g_weight = _WeightGradient.apply(g_out, ctx.x, ctx.weight_shape, ctx.conv, ctx.conf)
        g_bias = g_out.sum([0, *range(2, g_out.dim())]) if ctx.has_bias else None
        return None, g_weight, g_bias, None, None


class DataConvolutions(TorchFunctionMode):
    """Within this mode, ``F.conv1d/2d/3d`` of an input that needs no gradient (the data) by a
    weight that does go through :class:`_DataConvolution`; every other call is unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        d = _CONVOLUTIONS.get(func)
        if d is not None:
            a = dict(zip(_ARGUMENTS, _DEFAULTS))
            a.update(zip(_ARGUMENTS, args))
            a.update(kwargs)
            x, weight = a["input"], a["weight"]
            if (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() == d + 2
                    and not x.requires_grad and weight.requires_grad and not isinstance(a["padding"], str)):
                conf = (_expand(a["stride"], d), _expand(a["padding"], d), _expand(a["dilation"], d), int(a["groups"]))
                return _DataConvolution.apply(x, weight, a["bias"], func, conf)
        return func(*args, **kwargs)
