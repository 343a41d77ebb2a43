"""smoothchain.train and ``smoothchain train`` (issue 5 item 6 and the acceptance criteria):

* a run killed mid-way (``stop_after``) resumes from its last atomic checkpoint and ends with
  exactly the metrics (and weights) of an uninterrupted run: no record lost or duplicated;
* batch DSGD with lr = 1 never increases the training objective on digits (q = 1, 2, inf);
  ``SMOOTHCHAIN_DSGD_LONG=1`` runs 3000 steps instead of 150;
* every optimizer option runs through the CLI (Gauss-Newton / Newton skipped until
  ``smoothchain.optim`` provides them); bad input exits 2 with a one-line error.
"""

from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")

from smoothchain import cli  # noqa: E402
from smoothchain.train import TrainConfig, build_model, load_data, train  # noqa: E402

LONG = os.environ.get("SMOOTHCHAIN_DSGD_LONG", "") not in ("", "0")


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", limit=150, dtype=torch.float64)


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.mark.parametrize("optimizer, q, batch", [("dsgd", 2.0, 0), ("random", math.inf, 16),
                                                  ("sgd", 2.0, 16)])
def test_killed_run_resumes_without_losing_metrics(tmp_path, digits, optimizer, q, batch):
    common = dict(optimizer=optimizer, q=q, hidden=12, steps=14, batch_size=batch, lr=None if
                  optimizer == "dsgd" else 0.5, checkpoint_every=4, eval_every=3, dtype="float64",
                  plots=False, seed=3)
    full = TrainConfig(out=str(tmp_path / "full"), **common)
    train(full, data=digits, progress=False)
    part = TrainConfig(out=str(tmp_path / "part"), **common)
    assert train(part, data=digits, progress=False, stop_after=10) == {"stopped_at": 10}
    killed = _lines(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in killed] == list(range(1, 11))  # written through step 10
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 8  # last checkpoint before the kill
    train(TrainConfig(out=str(tmp_path / "part"), resume=True, **common), data=digits, progress=False)
    a, b = _lines(tmp_path / "full" / "metrics.jsonl"), _lines(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 15))
    assert a == b
    ma = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    mb = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    for k in ma:
        assert torch.equal(ma[k], mb[k])
    assert not list((tmp_path / "part").glob("*.tmp"))


@pytest.mark.parametrize("q", [1.0, 2.0, math.inf], ids=["q1", "q2", "qinf"])
def test_batch_dsgd_never_increases_loss_on_digits(digits, q):
    steps = 3000 if LONG else 150
    cfg = TrainConfig(optimizer="dsgd", q=q, hidden=20, steps=steps, batch_size=0, dtype="float64",
                      eval_every=steps, plots=False)
    holder = {}
    train(cfg, data=digits, progress=False, metrics_out=holder)
    losses = [r["loss"] for r in holder["metrics"]]  # full-batch objective before each step
    assert max(b - a for a, b in zip(losses, losses[1:])) <= 1e-12 * losses[0]
    assert losses[-1] < losses[0]


def test_build_model_is_flynn_section5():
    net = build_model(64, 300, 10, seed=0)
    params = list(net.parameters())
    assert [tuple(p.shape) for p in params] == [(300, 64), (300,), (10, 300), (10,)]
    assert all(float(p.abs().max()) <= 1.0 for p in params)
    assert float(params[0].min()) < -0.95 and float(params[0].max()) > 0.95
    assert isinstance(net[1], torch.nn.Sigmoid) and isinstance(net[3], torch.nn.Sigmoid)


@pytest.mark.parametrize("opt", ["dsgd", "dsgd-all", "random", "sequential", "sgd-norm", "sgd", "gd"])
def test_cli_train_every_optimizer(tmp_path, capsys, opt):
    out = tmp_path / opt
    batch = "0" if opt in ("dsgd", "gd", "random", "sequential") else "16"
    rc = cli.main(["train", "--optimizer", opt, "--q", "inf", "--data", "digits", "--limit", "80",
                   "--hidden", "8", "--steps", "6", "--batch-size", batch, "--out", str(out),
                   "--eval-every", "3", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == 6 and doc["optimizer"] == opt
    recs = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert {"train_error", "test_accuracy"} <= set(recs[-1])
    if opt in ("dsgd", "random", "sequential"):
        assert sum(recs[-1]["counts"]) == 6 and all(len(r["layers"]) == 1 for r in recs)
    if opt == "dsgd-all":
        assert recs[-1]["counts"] == [6, 6]
    names = {p.name for p in out.iterdir()}
    assert {"training_error.png", "test_accuracy.png", "checkpoint.pt", "summary.json"} <= names
    assert ("layer_updates.png" in names) == (opt not in ("sgd", "gd"))


@pytest.mark.parametrize("opt", ["gauss-newton", "newton"])
def test_cli_train_second_order(tmp_path, capsys, opt):
    import smoothchain.optim as so

    if not hasattr(so, "GaussNewton" if opt == "gauss-newton" else "Newton"):
        pytest.skip("smoothchain.optim does not provide it yet")
    rc = cli.main(["train", "--optimizer", opt, "--data", "digits", "--limit", "60", "--hidden", "4",
                   "--steps", "3", "--out", str(tmp_path), "--no-plots", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["steps"] == 3


def test_cli_bad_input(tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    missing.mkdir()
    assert cli.main(["train", "--data", str(missing), "--steps", "1", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoothchain: error:") and "\n" not in err
    assert "train-images-idx3-ubyte" in err and str(missing) in err
    assert cli.main(["train", "--resume", "--steps", "1"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--resume", "--steps", "1"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--q", "3"])
