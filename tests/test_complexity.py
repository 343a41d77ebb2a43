"""Tests of smoothchain.complexity and ``smoothchain complexity`` (RH Prop. 3.3, Cor. 3.4, Prop. C.5,
Prop. 3.5, Algo. 4): predicted vs measured FLOPs on the built-in MLP and CNN.

Relations asserted (each can fail; docs/complexity.md says why they hold):

* per layer, exactly: measured forward FLOPs = 2 s'_beta and backward = 4 s'_beta (FlopCounterMode
  counts 2 per multiply-add of the matrix products / convolutions only; the backward forms the
  two products of Prop. C.5's proof), with s_beta, s_a computed here by hand from the
  architecture (RH Fact C.4, Def. C.3);
* per layer: measured backward <= Prop. 3.3's dense count (structure only removes work), and
  the bilinear part of Prop. C.5 in FLOPs, 2 x 2 s_beta, is >= the measured backward;
* whole steps, exactly: the gradient step, the Gauss-Newton step by the dual (given the counted
  oracle calls) and the Riccati passes of Algo. 4 (halvings included);
* Newton's assembly: 1 <= measured / predicted <= 1.5 (the prediction counts the non-zero
  tangent products; torch.func's batching rules for convolutions also form the 2 zero ones
  of the 6, at most 1.5x);
* our FLOP mode equals torch.utils.flop_counter.FlopCounterMode where the latter runs.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from smoothchain.cli import main  # noqa: E402
from smoothchain.complexity import (  # noqa: E402
    FlopCount,
    complexity_report,
    layer_costs,
    riccati_flops,
)
from smoothchain.models import builtin  # noqa: E402
from smoothchain.torch_chain import torch_module  # noqa: E402

DT = torch.float64
M = 3



def built(name):
    torch.manual_seed(0)
    spec = builtin(name)
    return torch_module(spec.components, spec.names).to(DT), spec.input_shape


# Fact C.4 / Def. C.3 by hand: (name, s_beta, s_beta_v, s'_beta, s_a) for batch M
HAND = {
    "mlp": [("fc1", M * 32 * (64 + 1), 0, M * 32 * 64, M * 32),            # tanh on 32
            ("fc2", M * 10 * (32 + 1), 0, M * 10 * 32, 0)],
    "cnn": [("conv1", M * 64 * 8 * 9, M * 64 * 8, M * 64 * 8 * 9, 2 * M * 8 * 64),   # softplus, pool
            ("conv2", M * 16 * 16 * 72, M * 16 * 16, M * 16 * 16 * 72, 2 * M * 16 * 16),
            ("fc", M * 10 * (64 + 1), 0, M * 10 * 64, 0)],
}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_layer_costs_predicted_equal_measured(name):
    model, shape = built(name)
    x = torch.rand((M,) + shape, dtype=DT)
    costs = layer_costs(model, x)
    assert [(c.name, c.s_beta, c.s_beta_v, c.s_beta_mults, c.s_a) for c in costs] == HAND[name]
    for c in costs:
        assert c.measured_forward == c.forward_flops == 2 * c.s_beta_mults
        assert c.measured_backward == c.backward_flops == 4 * c.s_beta_mults
        assert c.measured_backward <= c.prop_3_3_backward                    # dense Prop. 3.3 bounds it
        assert c.measured_backward <= 2 * (c.prop_c5_backward - c.s_a - c.s_beta_v)   # C.5 in FLOPs
        assert c.prop_c5_backward == c.s_a + 2 * c.s_beta + c.s_beta_v
    assert sum(c.rho for c in costs) == sum(p.numel() for p in model.parameters())


def test_flop_mode_matches_flop_counter_mode():
    """On plain autograd (where FlopCounterMode's module tracker works), same totals."""
    model, shape = built("cnn")
    x = torch.rand((M,) + shape, dtype=DT)

    def run():
        out = model(x)
        torch.autograd.grad(out.square().sum(), list(model.parameters()))

    with FlopCounterMode(display=False) as ref:
        run()
    with FlopCount() as ours:
        run()
    assert ours.total == ref.get_total_flops() > 0


@pytest.mark.parametrize("name, loss", [("mlp", "cross-entropy"), ("cnn", "square")])
def test_step_costs_predicted_vs_measured(name, loss):
    model, shape = built(name)
    doc = complexity_report(model, shape, M, loss=loss, l2=1e-3, gamma=1.0)
    steps, q = doc["steps"], doc["q"]
    assert steps["gradient"]["predicted"] == steps["gradient"]["measured"]
    gn = steps["gauss_newton_dual"]
    assert gn["predicted"] == gn["measured"]
    assert gn["oracle_calls"] == gn["backward_calls"] + gn["linearize_calls"] <= 2 * q + 1 == gn["bound_2q_plus_1"]
    nt = steps["newton_dp"]
    assert nt["oracle_calls"] == 1
    assert nt["failed_at"], "test precondition: gamma = 1 needs halving here (failed Riccati passes)"
    assert nt["riccati_passes"] == len(nt["failed_at"]) + 1
    assert nt["predicted_riccati"] == nt["measured_riccati"]
    assert 1.0 <= nt["measured_assembly"] / nt["predicted_assembly"] <= 1.5
    assert gn["measured"] < nt["measured"]            # CG on the dual is far cheaper than the DP


def test_riccati_flops_by_hand():
    """Two layers (delta_0, delta_1, delta_2) = (2, 3, 4), rho = (5, 6): stage 2 complete, stage 1 only
    B^T C B; a pass failing at stage 2 (index 1) adds stage 2's B^T C B only."""
    from smoothchain.complexity import LayerCost

    def lc(d_in, d_out, rho):
        return LayerCost(1, "x", "linear", 1, d_in, d_out, rho, *([0] * 11))

    layers = [lc(2, 3, 5), lc(3, 4, 6)]
    bcb = lambda d, r: 2 * r * d * d + 2 * r * d * r  # noqa: E731
    stage2 = bcb(4, 6) + 2 * 4 * 4 * 3 + 2 * 6 * 4 * 3 + 2 * 3 * 6 * 3 + 2 * 3 * 4 * 3
    assert riccati_flops(layers)[0] == stage2 + bcb(3, 5)
    assert riccati_flops(layers, (1,))[0] == bcb(4, 6) + stage2 + bcb(3, 5)
    assert riccati_flops(layers, (0,))[0] == stage2 + bcb(3, 5) + stage2 + bcb(3, 5)


# ----------------------------------------------------------------------------- CLI
def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_complexity_json_mlp(capsys):
    code, out, _ = run(capsys, "complexity", "--model", "mlp", "--batch-size", "2", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["model"] == "mlp" and doc["batch_size"] == 2 and doc["q"] == 20
    assert [c["name"] for c in doc["layers"]] == ["fc1", "fc2"]
    assert all(c["measured_backward"] == c["backward_flops"] for c in doc["layers"])
    assert doc["steps"]["gradient"]["measured"] == doc["steps"]["gradient"]["predicted"]


def test_cli_complexity_table_cnn(capsys):
    code, out, _ = run(capsys, "complexity", "--model", "cnn", "--batch-size", "2", "--no-steps")
    assert code == 0
    assert "conv1 (conv2d)" in out and "fc (linear)" in out and "Prop C.5" in out
    assert "oracle steps" not in out


def test_cli_complexity_module(tmp_path, capsys):
    f = tmp_path / "net.py"
    f.write_text("from torch import nn\n"
                 "def make():\n"
                 "    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))\n"
                 "def bad():\n"
                 "    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))\n")
    code, out, _ = run(capsys, "complexity", "--module", f"{f}:make", "--input-shape", "2,4,4",
                       "--batch-size", "2", "--loss", "square", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [c["kind"] for c in doc["layers"]] == ["conv2d", "linear"]
    assert doc["layers"][0]["s_beta_mults"] == 2 * 4 * 3 * 18       # m n_p n_f s_f
    assert doc["steps"]["gauss_newton_dual"]["measured"] == doc["steps"]["gauss_newton_dual"]["predicted"]
    code, out, err = run(capsys, "complexity", "--module", f"{f}:make")
    assert code == 2 and "--input-shape" in err and len(err.strip().splitlines()) == 1 and out == ""
    code, out, err = run(capsys, "complexity", "--module", f"{f}:bad", "--input-shape", "4", "--no-steps")
    assert code == 2 and "BatchNorm1d" in err and len(err.strip().splitlines()) == 1
