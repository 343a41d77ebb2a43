"""An example user model for `smoothchain certify --module examples/my_net.py:make_model`."""

import torch
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2),
        nn.Softplus(),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(16, affine=False)),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )
