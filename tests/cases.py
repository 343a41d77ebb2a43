"""Shared seeded cases and the one comparison helper of the suite (in the manner of curvlinops'
``test/cases.py``): small float64 chains with data, built under a forked RNG (the global torch
generator is left as it was), and ``rel_err`` / ``assert_rel_close`` with explicit tolerances.

Imported by the test modules (``from cases import ...``; pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

DT = torch.float64


@contextlib.contextmanager
def seeded(seed: int):
    """Run a case builder with torch's generator at ``seed``, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Case:
    """A chain, its batch and its objective: ``build()`` -> (model, x, y)."""

    id: str
    build: Callable
    loss: str
    l2: float


def _mlp_tanh_square():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    return model, torch.randn(3, 3, dtype=DT), torch.randn(3, 2, dtype=DT)


def _mlp_sigmoid_softplus_ce():
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Softplus(),
                          nn.Linear(4, 3)).to(DT)
    return model, torch.randn(3, 3, dtype=DT), torch.tensor([0, 2, 1])


def _cnn_softplus_ce():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(8, 3)).to(DT)
    return model, torch.randn(2, 1, 6, 6, dtype=DT), torch.tensor([1, 0])


def _cnn_nested_square():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(2, 2, 2, bias=False), nn.Tanh()),
                          nn.Flatten(), nn.Linear(18, 2), nn.Sigmoid()).to(DT)
    return model, torch.randn(2, 2, 4, 4, dtype=DT), torch.randn(2, 2, dtype=DT)


def _flatten_first_ce():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(),
                          nn.Linear(3, 2, bias=False)).to(DT)
    return model, torch.randn(2, 2, 2, dtype=DT), torch.tensor([1, 1])


def _soft_labels_ce():
    model = nn.Sequential(nn.Linear(2, 3), nn.Softplus(), nn.Linear(3, 3)).to(DT)
    return model, torch.randn(2, 2, dtype=DT), torch.softmax(torch.randn(2, 3, dtype=DT), 1)


#: the chains every oracle is tested on; each builds under seed = its position + 1
CHAINS = [
    Case("mlp-tanh-square", _mlp_tanh_square, "square", 0.1),
    Case("mlp-sigmoid-softplus-ce", _mlp_sigmoid_softplus_ce, "cross-entropy", 0.05),
    Case("cnn-softplus-pool-ce", _cnn_softplus_ce, "cross-entropy", 0.01),
    Case("cnn-nested-nobias-square", _cnn_nested_square, "square", 0.2),
    Case("flatten-first-ce-l2-0", _flatten_first_ce, "cross-entropy", 0.0),
    Case("soft-labels-ce", _soft_labels_ce, "cross-entropy", 0.03),
]


def build(case: Case, seed: int | None = None):
    """(model, x, y) of ``case``, seeded by its position in :data:`CHAINS` unless ``seed`` is given."""
    with seeded(CHAINS.index(case) + 1 if seed is None else seed):
        return case.build()


# ----------------------------------------------------------------------------- comparison
def flat(ts) -> torch.Tensor:
    """One vector from a tensor or a sequence of tensors."""
    if isinstance(ts, torch.Tensor):
        return ts.reshape(-1)
    return torch.cat([t.reshape(-1) for t in ts])


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all entries (a, b tensors or sequences of tensors)."""
    a, b = flat(a), flat(b)
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def assert_rel_close(actual, expected, *, rtol: float, what: str = "") -> None:
    """``rel_err(actual, expected) <= rtol``, with both numbers in the message."""
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what or 'values'}: relative error {err:.3e} > {rtol:.1e}"


# ----------------------------------------------------------------------------- the set C
def functional_output(net: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """w -> net(x) flattened, w the parameters in ``named_parameters`` order (batch statistics
    for batch norm: the module in training mode, as RH eq. 11 certifies it)."""
    import copy

    net = copy.deepcopy(net)
    for m in net.modules():  # batch statistics always, and no running-statistics update to trace
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
            m.train()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def psi(w):
        params, pos = {}, 0
        for n, s, k in zip(names, shapes, sizes):
            params[n] = w[pos:pos + k].reshape(s)
            pos += k
        return torch.func.functional_call(net, params, (x,)).reshape(-1)

    return psi


def point_in_balls(net: nn.Module, radius: float, gen: torch.Generator, *, boundary: bool,
                   centre: torch.Tensor | None = None) -> torch.Tensor:
    """A point of C = {||v_n - v*_n|| <= radius for every module holding parameters} (a layer's
    weight and bias form one ball), on every ball's boundary or at a random radius inside."""
    sizes = [(n.rsplit(".", 1)[0], p.numel()) for n, p in net.named_parameters()]
    w = torch.randn(sum(k for _, k in sizes), generator=gen, dtype=DT)
    pos, spans = 0, {}
    for owner, k in sizes:
        spans.setdefault(owner, []).append(torch.arange(pos, pos + k))
        pos += k
    for parts in spans.values():
        idx = torch.cat(parts)
        r = radius if boundary else radius * float(torch.rand((), generator=gen, dtype=DT))
        w[idx] *= r / w[idx].norm()
    return w if centre is None else centre + w
