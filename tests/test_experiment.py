"""``smoothchain experiment dsgd`` (F Sec. 5 protocol, tiny sizes) and ``experiment prop21``
(F Sec. 2, Prop. 2.1: unbounded Hessian, bounded layer blocks)."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from smoothchain import cli  # noqa: E402
from smoothchain.experiments import prop21, prop21_quantities  # noqa: E402


def test_experiment_dsgd_writes_report_and_figures(tmp_path, capsys):
    out = tmp_path / "exp"
    rc = cli.main(["experiment", "dsgd", "--data", "digits", "--limit", "90", "--hidden", "6",
                   "--batch-steps", "4", "--minibatch-steps", "4", "--tune-steps", "2",
                   "--batch-size", "16", "--qs", "2,inf", "--grid", "0.1,1", "--eval-every", "2",
                   "--out", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["batch"]) == {"2", "inf"}
    for e in doc["batch"].values():
        assert e["dsgd"]["lr"] == 1.0 and sum(e["dsgd"]["counts"]) == 4
        assert e["random"]["lr"] in (0.1, 1.0) and e["best_layerwise"] in ("random", "sequential")
    assert {"sgd_standard", "dsgd-all_q2", "sgd-norm_qinf"} <= set(doc["minibatch"])
    report = (out / "report.md").read_text()
    for fig in doc["figures"]:
        assert (out / fig).stat().st_size > 0 and fig in report
    assert "batch_qinf_layer_updates.png" in doc["figures"]
    assert "minibatch_test_accuracy.png" in doc["figures"]


def test_experiment_dsgd_missing_directory(tmp_path, capsys):
    assert cli.main(["experiment", "dsgd", "--data", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cifar-10-batches-py" in err


def test_prop21_hessian_grows_while_layer_blocks_stay_bounded():
    rows = [prop21_quantities(e) for e in (0.0, 10.0, 100.0, 1000.0)]
    res = prop21(None, eps_max=1000.0, points=3)
    # F's proof: d2E/dw1dw3 (w(eps)) = slope * eps + intercept, slope > 0 (y <= 0)
    assert res["slope_predicted"] > 0
    for r in rows:
        assert r["d2E_dw1dw3"] == pytest.approx(res["slope_predicted"] * r["eps"] + res["intercept_predicted"],
                                                rel=1e-9, abs=1e-12)
    norms = [r["hessian_norm"] for r in rows]
    assert norms == sorted(norms) and norms[-1] > 100 * norms[1] / 10 > 0  # linear growth
    assert norms[-1] >= res["slope_predicted"] * 1000 * 0.99
    for r in rows:  # F Prop. 4.3: ||d2f/dw_i^2|| <= p_i(w)^2, i.e. Assumption 3.5 with L = 1
        assert all(b <= p for b, p in zip(r["block_norms"], r["p_squared"]))
        assert r["local_constant"] <= 1.0
    with pytest.raises(ValueError, match="y <= 0"):
        prop21(None, y=0.5)


def test_cli_prop21(tmp_path, capsys):
    assert cli.main(["experiment", "prop21", "--out", str(tmp_path), "--points", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (tmp_path / "prop21.png").stat().st_size > 0
    assert json.loads((tmp_path / "prop21.json").read_text())["rows"] == doc["rows"]
    assert math.isclose(doc["rows"][-1]["eps"], 1000.0)
