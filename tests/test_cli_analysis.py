"""`smoothchain pl` and `smoothchain rates` (in-process through smoothchain.cli.main)."""

from __future__ import annotations

import json

import pytest
import torch

from smoothchain.cli import main



def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rates_sgd_json_reproduces_doc_example(capsys):
    code, out, _ = run(capsys, "rates", "sgd", "--delta", "2", "--beta", "4", "--eta", "0.25", "--iterations", "100",
                       "--sigma2", "1", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["bound"] == pytest.approx(1.16, rel=1e-15)


def test_rates_sgd_default_step_and_target(capsys):
    code, out, _ = run(capsys, "rates", "sgd", "--delta", "2", "--beta", "4", "--iterations", "100", "--sigma2", "1",
                       "--target", "0.9", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["eta"] == pytest.approx(0.1) and doc["bound"] == pytest.approx(0.8)
    # floor 4*0.1*1 = 0.4, room 0.5: ceil(4 / (0.1*0.5)) = 80
    assert doc["iterations_needed"] == 80


def test_rates_pl_gd_json(capsys):
    code, out, _ = run(capsys, "rates", "pl", "--delta", "1", "--beta", "2", "--mu", "0.5", "--eta", "0.5",
                       "--iterations", "3", "--sigma2", "0.4", "--target", "0.5", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["bound"] == pytest.approx(0.821875) and doc["iterations_needed"] == 9
    code, out, _ = run(capsys, "rates", "gd", "--smoothness", "3", "--delta", "2", "--epsilon", "0.5", "--json")
    assert code == 0 and json.loads(out)["iterations"] == 48
    code, out, _ = run(capsys, "rates", "pl", "--delta", "1", "--beta", "2", "--mu", "0.5", "--iterations", "3",
                       "--sigma2", "0.4", "--target", "0.3", "--json")
    assert json.loads(out)["iterations_needed"] == "inf"  # below the noise floor 2*0.5*0.4/1 = 0.4


def test_rates_bad_input_is_one_line_exit_2(capsys):
    code, out, err = run(capsys, "rates", "sgd", "--delta", "1", "--beta", "4", "--eta", "1", "--iterations", "10")
    assert code == 2 and out == "" and "eta <= 1/beta" in err and err.count("\n") == 1
    code, _, err = run(capsys, "rates", "pl", "--delta", "1", "--beta", "1", "--mu", "2", "--iterations", "1")
    assert code == 2 and "mu > beta" in err


def test_rates_noise_json(capsys):
    code, out, _ = run(capsys, "rates", "noise", "--data", "random", "--examples", "40", "--batch-size", "4",
                       "--samples", "20", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["sigma2"] > 0 and doc["stderr"] > 0 and doc["samples"] == 20


def test_pl_command_on_overparameterised_mlp(capsys):
    code, out, _ = run(capsys, "pl", "--data", "random", "--samples", "5", "--points", "2", "--radius", "0.1", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["parameters"] == 64 * 32 + 32 + 32 * 10 + 10 and doc["outputs"] == 50 and doc["over_parameterised"]
    assert doc["sigma_min"] > 0
    assert doc["mu"] == pytest.approx(2 * doc["sigma_min"] ** 2 / 5, rel=1e-12)
    nb = doc["neighbourhood"]
    assert nb["sigma_min"] <= doc["sigma_min"] and nb["radius"] == 0.1


def test_pl_command_recovers_mu_of_linear_module(tmp_path, capsys):
    """--module: a linear model on N = 3 random inputs; sigma_min = smallest singular value of X
    (independent numpy SVD), mu = 2 s^2 / N."""
    f = tmp_path / "lin.py"
    f.write_text("import torch\ndef make():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Linear(8, 2, bias=False))\n")
    code, out, _ = run(capsys, "pl", "--module", f"{f}:make", "--data", "random", "--input-shape", "8",
                       "--samples", "3", "--points", "1", "--seed", "4", "--json")
    assert code == 0
    doc = json.loads(out)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn((3, 8), generator=gen, dtype=torch.float64)  # the command's random data
    import numpy as np

    s = float(np.linalg.svd(X.numpy(), compute_uv=False).min())
    assert doc["sigma_min"] == pytest.approx(s, rel=1e-9)
    assert doc["mu"] == pytest.approx(2 * s * s / 3, rel=1e-9)


def test_pl_bad_input(capsys):
    code, _, err = run(capsys, "pl", "--model", "resnet", "--json")
    assert code == 2 and "unknown model" in err
