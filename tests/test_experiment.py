"""``smoothchain experiment dsgd`` (F Sec. 5 protocol, tiny sizes) and ``experiment prop21``
(F Sec. 2, Prop. 2.1: unbounded Hessian, bounded layer blocks)."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from smoothchain import cli  # noqa: E402
from smoothchain.experiments import _quarter_shares, f_claims, prop21, prop21_quantities  # noqa: E402


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
    # F's observations, claim by claim, in the results and the report
    assert doc["claims"] and all(set(c) == {"claim", "where", "measured", "holds"} for c in doc["claims"])
    assert "claim by claim" in report and all(c["where"] in report for c in doc["claims"])
    assert all(e["dsgd"]["seconds_per_step"] > 0 for e in doc["batch"].values())


def _fake_results(counts1, shares2, sharesinf, errors, accs, times, mini_times=(1.1, 4.0, 1.05)):
    """A results dict shaped like dsgd_experiment's, with chosen numbers (the claims' inputs)."""
    def run(err, t, counts=(1, 1), first=0.9, shares=()):
        return {"final": {"train_error": err, "test_accuracy": 1 - err}, "counts": list(counts),
                "first_error": first, "layer1_share_by_quarter": list(shares), "seconds_per_step": t, "lr": 1.0}
    batch = {}
    for ql, counts, shares in (("1", counts1, []), ("2", (5, 5), shares2), ("inf", (5, 5), sharesinf)):
        batch[ql] = {"dsgd": run(errors[0], times[0], counts, shares=shares),
                     "random": run(errors[1], times[1]), "sequential": run(errors[1] + 0.01, times[1]),
                     "best_layerwise": "random"}
    mini = {"sgd_standard": {"method": "SGD_STANDARD", "final": {"test_accuracy": accs[0]}, "seconds_per_step": 1.0}}
    for ql, a, t in zip(("1", "2", "inf"), accs[1:], mini_times):
        mini[f"dsgd-all_q{ql}"] = {"method": f"DSGD_ALL q={ql}", "final": {"test_accuracy": a}, "seconds_per_step": t}
    return {"batch": batch, "minibatch": mini}


def test_f_claims_hold_and_fail_on_chosen_numbers():
    """Each claim's verdict follows its numbers: F's picture holds, and each part can fail."""
    good = f_claims(_fake_results((0, 9), [0.5, 0.55, 0.5, 0.45], [0.9, 0.2, 0.5, 0.1], (0.2, 0.1),
                                  (0.95, 0.7, 0.9, 0.8), (1.02, 1.0)))
    assert len(good) == 10 and all(c["holds"] for c in good), [c for c in good if not c["holds"]]
    bad = f_claims(_fake_results((3, 6), [0.9, 0.1, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], (0.05, 0.1),
                                 (0.5, 0.7, 0.6, 0.9), (2.0, 1.0), mini_times=(1.1, 2.0, 3.0)))
    assert not any(c["holds"] for c in bad), [c for c in bad if c["holds"]]
    # "trains": an error that did not halve from the first evaluation does not count
    stalled = f_claims(_fake_results((0, 9), [0.5] * 4, [0.9, 0.1, 0.5, 0.5], (0.6, 0.1),
                                     (0.95, 0.7, 0.9, 0.8), (1.0, 1.0)))
    assert [c["holds"] for c in stalled if "trains" in c["claim"]] == [False] * 3


def test_quarter_shares_from_cumulative_counts():
    counts = [[1, 0], [2, 0], [2, 1], [2, 2], [3, 2], [4, 2], [4, 3], [4, 4]]
    assert _quarter_shares([{"counts": c} for c in counts]) == [1.0, 0.0, 1.0, 0.0]


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
