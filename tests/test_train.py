"""smoothchain.train and ``smoothchain train`` (issue 5 item 6 and the acceptance criteria):

* a run killed mid-way resumes from its last atomic checkpoint and ends with exactly the metrics
  (and weights) of an uninterrupted run, no record lost or duplicated: a ``smoothchain train``
  subprocess SIGKILLed while writing a checkpoint, an injected KeyboardInterrupt, and a
  simulated stop (``stop_after``) for three optimizers;
* F Assumption 4.1 (ii) is checked for dsgd (error, or ``--rescale-data``);
* batch DSGD with lr = 1 never increases the training objective on digits (q = 1, 2, inf),
  1500 steps per q (``SMOOTHCHAIN_DSGD_LONG=1``: 6000);
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
from smoothchain.checkpoint import read_checkpoint  # noqa: E402
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
    ck = read_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ck["step"] == 8  # last checkpoint before the kill
    train(TrainConfig(out=str(tmp_path / "part"), resume=True, **common), data=digits, progress=False)
    a, b = _lines(tmp_path / "full" / "metrics.jsonl"), _lines(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 15))
    assert a == b
    ma = read_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    mb = read_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    for k in ma:
        assert torch.equal(ma[k], mb[k])
    assert not list((tmp_path / "part").glob("*.tmp"))


KILLER = """
import os, signal, sys
from smoothchain import checkpoint, cli

real_write, calls = checkpoint._write, [0]


def write(tmp, header, data):  # SIGKILL half-way through writing the 3rd checkpoint
    calls[0] += 1
    if calls[0] == 3:
        with open(tmp, "wb") as fh:
            fh.write(b"partial checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(tmp, header, data)


checkpoint._write = write
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkilled_cli_run_resumes_exactly(tmp_path, capsys):
    """``smoothchain train`` in a subprocess, SIGKILLed while writing its checkpoint of step 12
    (steps 9-12 already in metrics.jsonl, the checkpoint of step 8 on disk), then ``--resume``:
    metrics.jsonl and the weights equal those of an uninterrupted run -- same steps, no gaps,
    no duplicates, same values; the partial temporary file is gone."""
    import subprocess
    import sys

    args = ["train", "--optimizer", "dsgd", "--q", "inf", "--data", "digits", "--limit", "120",
            "--hidden", "10", "--steps", "14", "--batch-size", "16", "--checkpoint-every", "4",
            "--eval-every", "3", "--dtype", "float64", "--seed", "7", "--no-plots", "--json"]
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), *args, "--out", str(killed)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in _lines(killed / "metrics.jsonl")] == list(range(1, 13))
    assert read_checkpoint(killed / "checkpoint.pt")["step"] == 8
    assert (killed / "checkpoint.pt.tmp").read_bytes() == b"partial checkpoint"
    assert cli.main([*args, "--out", str(killed), "--resume"]) == 0
    assert cli.main([*args, "--out", str(ref)]) == 0
    capsys.readouterr()
    a, b = _lines(ref / "metrics.jsonl"), _lines(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 15)) and a == b
    ma = read_checkpoint(ref / "checkpoint.pt")["model"]
    mb = read_checkpoint(killed / "checkpoint.pt")["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not list(killed.glob("*.tmp"))


def test_interrupted_run_resumes_exactly(tmp_path, digits, monkeypatch):
    """A KeyboardInterrupt injected after step 9's metrics line (checkpoint of step 8 on disk);
    the resumed run's metrics equal the uninterrupted run's."""
    import smoothchain.train as tr

    common = dict(optimizer="dsgd", q=1.0, hidden=12, steps=13, batch_size=0, checkpoint_every=4,
                  eval_every=5, dtype="float64", plots=False, seed=2)
    train(TrainConfig(out=str(tmp_path / "full"), **common), data=digits, progress=False)

    class Bar(tr.Progress):
        def update(self, done, info=""):
            if done == 9 and info:
                raise KeyboardInterrupt
            super().update(done, info)

    monkeypatch.setattr(tr, "Progress", Bar)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "part"), **common), data=digits, progress=False)
    monkeypatch.undo()
    assert [r["step"] for r in _lines(tmp_path / "part" / "metrics.jsonl")] == list(range(1, 10))
    train(TrainConfig(out=str(tmp_path / "part"), resume=True, **common), data=digits, progress=False)
    assert _lines(tmp_path / "part" / "metrics.jsonl") == _lines(tmp_path / "full" / "metrics.jsonl")


def test_assumption_41_checked_for_dsgd(tmp_path, digits):
    """Inputs beyond [-1, 1] (F Assumption 4.1 ii) are an error for dsgd, rescaled on request."""
    from dataclasses import replace

    big = replace(digits, x_train=digits.x_train * 3.0, x_test=digits.x_test * 3.0)
    cfg = TrainConfig(optimizer="dsgd", hidden=4, steps=2, dtype="float64", plots=False)
    with pytest.raises(ValueError, match=r"training split.*inputs.*3.*--rescale-data"):
        train(cfg, data=big, progress=False)
    a = train(replace(cfg, rescale_data=True), data=big, progress=False)
    b = train(cfg, data=digits, progress=False)
    for key in ("loss", "train_loss", "train_error", "test_accuracy"):  # rescaled = original
        assert a["final"][key] == pytest.approx(b["final"][key], rel=1e-12)
    train(replace(cfg, optimizer="sgd"), data=big, progress=False)  # no p_i: no assumption


@pytest.mark.parametrize("q", [1.0, 2.0, math.inf], ids=["q1", "q2", "qinf"])
def test_batch_dsgd_never_increases_loss_on_digits(digits, q):
    """1500 full-batch steps per q (~1 s each; ``SMOOTHCHAIN_DSGD_LONG=1``: 6000)."""
    steps = 6000 if LONG else 1500
    cfg = TrainConfig(optimizer="dsgd", q=q, hidden=20, steps=steps, batch_size=0, dtype="float64",
                      eval_every=steps, plots=False)
    holder = {}
    train(cfg, data=digits, progress=False, metrics_out=holder)
    losses = [r["loss"] for r in holder["metrics"]]  # full-batch objective before each step
    assert len(losses) == steps
    assert max(b - a for a, b in zip(losses, losses[1:])) <= 1e-12 * losses[0]
    assert losses[-1] < 0.5 * losses[0]


def test_build_model_is_flynn_section5():
    net = build_model(64, 300, 10, seed=0)
    params = [p.detach() for p in net.parameters()]
    assert [tuple(p.shape) for p in params] == [(300, 64), (300,), (10, 300), (10,)]
    assert all(float(p.abs().max()) <= 1.0 for p in params)
    assert float(params[0].min()) < -0.95 and float(params[0].max()) > 0.95
    assert isinstance(net[1], torch.nn.Sigmoid) and isinstance(net[3], torch.nn.Sigmoid)


def test_build_model_uses_only_its_own_generator():
    """The weights come from a generator seeded with ``seed`` (U[-1, 1] in float64, stored in
    float32); torch's global generator is neither seeded nor drawn from."""
    state = torch.get_rng_state()
    net = build_model(5, 7, 3, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    g = torch.Generator().manual_seed(11)
    for p in net.parameters():
        ref = (torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1).to(torch.float32)
        assert torch.equal(p.detach(), ref)


@pytest.mark.parametrize("optimizer, batch", [("random", 16), ("sgd", 16), ("dsgd", 0)])
def test_training_leaves_the_global_rng_alone(tmp_path, digits, optimizer, batch):
    """A run neither seeds nor draws from torch's global generator (its randomness -- weights,
    mini-batches, DSGD's "random" layers -- comes from explicit generators), and a resumed run
    does not depend on it: reseeding it before resuming changes nothing."""
    common = dict(optimizer=optimizer, q=math.inf, hidden=6, steps=8, batch_size=batch, lr=0.5,
                  checkpoint_every=3, eval_every=4, dtype="float64", plots=False, seed=4)
    state = torch.get_rng_state()
    train(TrainConfig(out=str(tmp_path / "full"), **common), data=digits, progress=False)
    train(TrainConfig(out=str(tmp_path / "part"), **common), data=digits, progress=False,
          stop_after=5)
    assert torch.equal(torch.get_rng_state(), state)
    ck = read_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert set(ck["rng"]) == {"batch"}  # the optimizer's own state travels in ck["optimizer"]
    torch.manual_seed(12345)
    train(TrainConfig(out=str(tmp_path / "part"), resume=True, **common), data=digits, progress=False)
    assert _lines(tmp_path / "part" / "metrics.jsonl") == _lines(tmp_path / "full" / "metrics.jsonl")


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
    rc = cli.main(["train", "--optimizer", opt, "--data", "digits", "--limit", "60", "--hidden", "4",
                   "--steps", "3", "--out", str(tmp_path), "--no-plots", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["steps"] == 3
    # the loss column is F's objective (eq. 21) on the batch before each step, as for SGD
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_cli_train_second_order_defaults_fit(tmp_path, capsys):
    """Newton with the command's defaults (a narrower net, mini-batches) runs on digits; with
    F's 300 hidden units and the full batch its dense layer matrices would not fit in memory."""
    rc = cli.main(["train", "--optimizer", "newton", "--data", "digits", "--steps", "2",
                   "--eval-every", "2", "--out", str(tmp_path), "--no-plots", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["hidden"] == 32 and summary["batch_size"] == 64


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


def test_saturated_and_no_op_runs_are_said(tmp_path, capsys):
    """A step size that saturates every sigmoid is a divergence (one warning line, diverged:
    true); --steps 0 and a finished run resumed write no figure and say so; full-batch sgd says
    it is gd; a sane run is not flagged."""
    base = ["train", "--optimizer", "sgd", "--data", "digits", "--limit", "100", "--hidden", "8", "--json"]
    assert cli.main([*base, "--lr", "1e30", "--steps", "5", "--out", str(tmp_path / "big")]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert summary["diverged"] and summary["divergence"].startswith("saturated") and summary["full_batch"]
    warns = [l for l in cap.err.splitlines() if l.startswith("smoothchain: warning:")]
    assert any("saturated" in w and "--lr" in w for w in warns) and any("full-batch" in w for w in warns)
    assert cli.main([*base, "--lr", "0.5", "--steps", "30", "--batch-size", "16", "--out", str(tmp_path / "ok")]) == 0
    cap = capsys.readouterr()
    assert not json.loads(cap.out)["diverged"] and "warning" not in cap.err
    assert cli.main([*base, "--steps", "0", "--out", str(tmp_path / "zero")]) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert not list((tmp_path / "zero").glob("*.png"))
    before = sorted(p.name for p in (tmp_path / "ok").iterdir())
    stamp = (tmp_path / "ok" / "summary.json").stat().st_mtime_ns
    assert cli.main([*base, "--lr", "0.5", "--steps", "30", "--batch-size", "16", "--out", str(tmp_path / "ok"),
                     "--resume"]) == 0
    assert "already finished at step 30" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == before
    assert (tmp_path / "ok" / "summary.json").stat().st_mtime_ns == stamp


def test_progress_rate_counts_this_processes_steps(monkeypatch, capsys):
    """A resumed run starts its bar at the checkpoint's step: the rate is the steps run since
    (not ~1e7 it/s), and the time left follows from it."""
    import smoothchain.train as tr

    now = iter([10.0, 10.0, 12.0])
    monkeypatch.setattr(tr.time, "perf_counter", lambda: next(now))
    bar = tr.Progress(3000, "dsgd", interactive=True)
    bar.update(1500)   # resumed at step 1500, at t = 10
    bar.update(1530)   # 30 steps in 2 s
    line = capsys.readouterr().err.split("\r")[-1]
    assert "1530/3000 15.0 it/s, 98 s left" in line


def test_progress_in_a_log_is_a_line_every_ten_percent(capsys):
    import smoothchain.train as tr

    bar = tr.Progress(200, "sgd", interactive=False)
    for t in range(201):
        bar.update(t, f"loss {1 / (t + 1):.3g}")
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert [ln.split()[2] for ln in lines] == [f"{20 * k}/200" for k in range(11)]
