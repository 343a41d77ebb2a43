"""Data-parallel DSGD (issue 5 item 9): a 2-process torchrun run (gloo, localhost) ends with the
same parameters (1e-6) and the same layer choices as the 1-process run with the same global
batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from smoothchain.train import TrainConfig, load_data, train  # noqa: E402

ARGS = ["--optimizer", "dsgd", "--q", "2", "--data", "digits", "--limit", "60", "--hidden", "8",
        "--steps", "6", "--batch-size", "16", "--dtype", "float64", "--eval-every", "3",
        "--no-plots", "--seed", "5"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_torchrun_matches_single_process(tmp_path):
    out2 = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "smoothchain", "train", *ARGS, "--out", str(out2), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2

    cfg = TrainConfig(optimizer="dsgd", q=2.0, hidden=8, steps=6, batch_size=16, dtype="float64",
                      eval_every=3, plots=False, seed=5, out=str(tmp_path / "one"))
    train(cfg, data=load_data("digits", limit=60, dtype=torch.float64), progress=False)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(out2 / "checkpoint.pt", weights_only=False)
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], rtol=0, atol=1e-6)
    assert [m["layers"] for m in two["metrics"]] == [m["layers"] for m in one["metrics"]]
    assert two["counts"] == one["counts"]
