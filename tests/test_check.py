"""`smoothchain check`: estimates never exceed certified bounds; violations are reported (exit 3)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

import smoothchain.check as check_mod
from smoothchain.check import check, layer_blocks
from smoothchain.cli import main


def tiny(act=nn.Tanh):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2))


def test_layer_blocks_cover_parameters_per_rh_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    blocks, ends = layer_blocks(model, (3,))
    # layer 1: Linear(3,4) weight+bias; layer 2: batch-norm affine (weight, bias); layer 3: Linear(4,2)
    assert [b.stop - b.start for b in blocks] == [16, 8, 8]
    assert ends == [-1, 3, 4]  # layer 1 ends inside the batch-norm module (its normalisation part)


@pytest.mark.parametrize("mode", ["paper", "tight"])
@pytest.mark.parametrize("around", [False, True])
def test_check_tiny_mlp_no_violation(mode, around):
    res = check(tiny(), input_shape=(3,), batch_size=2, mode=mode, around_weights=around, points=2,
                ascent_steps=3, iters=30, radius=0.5)
    assert res.violations == ()
    for r in res.layers:
        for k, v in r.estimated.items():
            assert v is not None and 0 < v <= r.certified[k]
    assert 0 < res.estimated["objective_smoothness"] <= res.certified["objective_smoothness"]
    doc = res.to_dict()
    assert set(doc) >= {"certified", "estimated", "violations"}
    assert set(doc["certified"]) == {"output_bound", "lipschitz", "smoothness", "objective_smoothness"}


def test_violation_is_reported_and_exit_3(monkeypatch, capsys):
    real = check_mod.certify

    def halved(*a, **k):  # a deliberately wrong certificate: every layer's Lipschitz bound / 1000
        cert = real(*a, **k)
        rows = tuple(replace(r, lipschitz=r.lipschitz / 1000) for r in cert.bounds.layers)
        return replace(cert, bounds=replace(cert.bounds, layers=rows, lipschitz=rows[-1].lipschitz))

    monkeypatch.setattr(check_mod, "certify", halved)
    code = main(["check", "--model", "mlp", "--batch-size", "2", "--points", "1", "--ascent-steps", "0",
                 "--iters", "10", "--no-per-layer", "--json"])
    assert code == 3
    doc = json.loads(capsys.readouterr().out)
    assert any(v["quantity"] == "lipschitz" for v in doc["violations"])


def test_check_rejects_spec(capsys):
    assert main(["check", "--spec", "x.json"]) == 2
    assert "needs a network" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_cli_check_builtin_models_json(model, capsys, tmp_path):
    """The acceptance run: `smoothchain check --json` on the built-in MLP and CNN exits 0 with no
    violations, a ratio in (0, 1] for every finite certified quantity of every layer, and a PNG."""
    png = tmp_path / "check.png"
    code = main(["check", "--model", model, "--points", "2", "--plot", str(png), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["violations"] == []
    assert png.stat().st_size > 0
    for k in ("output_bound", "lipschitz", "smoothness", "objective_smoothness"):
        assert 0 < doc["estimated"][k] <= doc["certified"][k]
    for row in doc["layers"]:
        for k, ratio in row["ratio"].items():
            assert ratio is not None and 0 < ratio <= 1, (row["name"], k, ratio)


def test_clock_time_left_closed_form():
    clock = check_mod._Clock(points=3, targets=2, start=0.0)
    assert clock.left(0, 0) is None  # nothing measured yet
    clock.record(0, 2.0)
    # point 1, target 1 not yet timed: costs the largest measured (2); then 2 points of 2 + 2
    assert clock.left(0, 1) == pytest.approx(2.0 + 2 * 4.0)
    clock.record(1, 5.0)
    clock.record(0, 4.0)  # target 0 now averages 3
    assert clock.left(1, 1) == pytest.approx(5.0 + 1 * 8.0)
    assert clock.left(2, 0) == pytest.approx(8.0)


def test_budget_stops_the_search_and_reports_what_it_found(monkeypatch):
    """A fake clock advancing 1 s per reading: the search stops once the budget is spent, the
    quantities reached keep their (sound) estimates, the others are None, nothing is a violation."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(check_mod.time, "monotonic", lambda: float(next(ticks)))
    lines = []
    res = check(tiny(), input_shape=(3,), points=3, ascent_steps=2, iters=10, radius=0.5, budget=12,
                progress=lines.append)
    assert res.stopped is not None and "budget of 12 s" in res.stopped
    assert res.estimated["objective_smoothness"] is not None  # the first estimate of every point
    assert 0 < res.estimated["objective_smoothness"] <= res.certified["objective_smoothness"]
    missing = [v for r in res.layers for v in r.estimated.values() if v is None]
    assert missing, "a 12 s budget on a fake 1 s/tick clock cannot reach every prefix"
    assert res.violations == ()
    for r in res.layers:
        for k, v in r.estimated.items():
            assert v is None or v <= r.certified[k]
    assert any("left" in s for s in lines) and lines[-1].startswith("check: stopped after")
    doc = res.to_dict()
    assert doc["stopped"] == res.stopped and doc["settings"]["budget_s"] == 12


def test_unlimited_search_is_complete_and_labels_name_module_types():
    res = check(tiny(), input_shape=(3,), points=1, ascent_steps=1, iters=10)
    assert res.stopped is None and res.budget is None and res.elapsed > 0
    assert [r.label for r in res.layers] == ["0 Linear", "2 Linear"]


def test_cli_budget_prints_partial_table_and_time_left(capsys):
    assert main(["check", "--model", "mlp", "--points", "2", "--ascent-steps", "1", "--iters", "5",
                 "--budget", "1e-9"]) == 0
    captured = capsys.readouterr()
    assert "stopped early: budget" in captured.out
    assert "check: stopped after" in captured.err
    assert main(["check", "--model", "mlp", "--points", "1", "--ascent-steps", "0", "--iters", "5"]) == 0
    err = capsys.readouterr().err
    assert "estimating time left" in err and "s left" in err and "check: done after" in err


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan", "soon"])
def test_cli_budget_must_be_positive_seconds(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "--model", "mlp", "--budget", bad])
    assert e.value.code == 2 and "--budget" in capsys.readouterr().err
