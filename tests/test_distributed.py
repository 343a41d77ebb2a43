"""Data-parallel DSGD (issue 5): a 2-process torchrun run (gloo, localhost) ends with the same
parameters (1e-6) and the same layer choices as the 1-process run with the same global batch,
and every rank leaves cleanly.

The clean exit is checked deterministically, not by luck: each rank runs ``smoothchain train``
through a wrapper that, after the command returned, asserts that no gloo thread is left
(``pt_gloo_runloop`` / ``gloo_tcp_loop``).  A surviving gloo thread is what made rank 1 die
with "terminate called without an active exception" (SIGABRT) at interpreter exit: it
released a tensor, needing the GIL of a finalising interpreter (see
``smoothchain.distributed``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from smoothchain.train import TrainConfig, load_data, train  # noqa: E402
from smoothchain.checkpoint import read_checkpoint  # noqa: E402

ARGS = ["--optimizer", "dsgd", "--q", "2", "--data", "digits", "--limit", "60", "--hidden", "8",
        "--steps", "6", "--batch-size", "16", "--dtype", "float64", "--eval-every", "3",
        "--no-plots", "--seed", "5"]

WRAPPER = """
import os, sys
from smoothchain import cli

rc = cli.main(sys.argv[1:])
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
left = [n for n in names if "gloo" in n]
print(f"rank {os.environ.get('RANK')}: gloo threads left: {left}", file=sys.stderr)
sys.exit(rc if not left else 17)
"""


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo not available")
def test_two_process_torchrun_matches_single_process(tmp_path):
    out2 = tmp_path / "two"
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "train", *ARGS, "--out", str(out2), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr
    if os.path.isdir("/proc/self/task"):
        for rank in (0, 1):
            assert f"rank {rank}: gloo threads left: []" in proc.stderr, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2

    cfg = TrainConfig(optimizer="dsgd", q=2.0, hidden=8, steps=6, batch_size=16, dtype="float64",
                      eval_every=3, plots=False, seed=5, out=str(tmp_path / "one"))
    train(cfg, data=load_data("digits", limit=60, dtype=torch.float64), progress=False)
    one = read_checkpoint(tmp_path / "one" / "checkpoint.pt")
    two = read_checkpoint(out2 / "checkpoint.pt")
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], rtol=0, atol=1e-6)
    assert [m["layers"] for m in two["metrics"]] == [m["layers"] for m in one["metrics"]]
    assert [m["step"] for m in two["metrics"]] == list(range(1, 7))
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)
    assert two["counts"] == one["counts"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo not available")
def test_nproc_bad_input_is_one_line_and_a_run_writes_once(tmp_path):
    """`train --nproc 2`: a batch larger than the data is one error line (rank 0's) and exit 2,
    no launcher report; a good run is 2 ranks, rank 0 writing the files."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "smoothchain", "train", "--nproc", "2", "--data", "digits", "--hidden", "8",
            "--no-plots", "--dtype", "float64"]
    bad = subprocess.run(base + ["--limit", "20", "--batch-size", "64", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["smoothchain: error: batch_size 64 exceeds the 20 training examples"]
    assert not (tmp_path / "bad").exists()
    good = subprocess.run(base + ["--limit", "60", "--batch-size", "16", "--steps", "2", "--out", str(tmp_path / "ok"),
                                  "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert good.returncode == 0, good.stderr[-3000:]
    summary = json.loads(good.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and len(good.stdout.strip().splitlines()) == 1
