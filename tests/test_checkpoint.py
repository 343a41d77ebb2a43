"""Checkpoints that are safe to open and survive kills (smoothchain.checkpoint, issue 15):

* the file format refuses truncated, damaged, foreign and code-carrying files with one line
  naming the file; the previous checkpoint is kept and used when the latest is unusable;
* ``train --resume`` compares options (model/optimizer-changing ones are an error listing each,
  harmless ones pass); ``--out`` that is a file, sits under a file or holds another run is
  refused before any work, nothing written;
* ``smoothchain train`` subprocesses SIGKILLed several times at random points (during a step,
  during a checkpoint write) and resumed end bit for bit where an uninterrupted run ends --
  parameters, metrics, optimizer state and the batch generator -- for dsgd q = 1, 2, inf, sgd
  and gauss-newton.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from smoothchain import cli  # noqa: E402
from smoothchain.checkpoint import (  # noqa: E402
    MAGIC, CheckpointError, load_checkpoint, previous_path, read_checkpoint, save_checkpoint)

PAYLOAD = {"config": {"optimizer": "sgd"}, "model": {"w": torch.arange(4.0)}, "optimizer": {}, "rng": {},
           "step": 3, "metrics": [{"step": 1, "loss": 0.5}], "counts": [0, 0]}


def _framed(data: bytes) -> bytes:
    return f"{MAGIC} 1 sha256={hashlib.sha256(data).hexdigest()} bytes={len(data)}\n".encode() + data


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_round_trip_and_rotation(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, PAYLOAD)
    assert not previous_path(path).exists()
    got = read_checkpoint(path)
    assert torch.equal(got["model"]["w"], PAYLOAD["model"]["w"]) and got["metrics"] == PAYLOAD["metrics"]
    save_checkpoint(path, {**PAYLOAD, "step": 4})
    assert read_checkpoint(path)["step"] == 4 and read_checkpoint(previous_path(path))["step"] == 3
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage, phrase", [
    (lambda raw: raw[: len(raw) // 2], "truncated"),
    (lambda raw: raw[:-10] + bytes(b ^ 0xFF for b in raw[-10:]), "damaged"),
    (lambda raw: raw.split(b"\n", 1)[1], "not a smoothchain checkpoint"),
    (lambda raw: raw.replace(b"checkpoint 1 ", b"checkpoint 9 ", 1), "format 9"),
    (lambda raw: b"", "not a smoothchain checkpoint"),
])
def test_unusable_files_are_named(tmp_path, damage, phrase):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, PAYLOAD)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=phrase) as exc:
        read_checkpoint(path)
    assert str(path) in str(exc.value)
    with pytest.raises(CheckpointError, match=phrase):  # no previous checkpoint to fall back to
        load_checkpoint(path)


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({**PAYLOAD, "model": _RunsCode(str(marker))}, buf)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_framed(buf.getvalue()))  # a valid checksum: its author can compute one
    with pytest.raises(CheckpointError, match="could run code"):
        read_checkpoint(path)
    assert not marker.exists()


def test_damaged_latest_falls_back_to_the_previous(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, PAYLOAD)
    save_checkpoint(path, {**PAYLOAD, "step": 4})
    path.write_bytes(path.read_bytes()[:100])
    payload, used, warning = load_checkpoint(path)
    assert payload["step"] == 3 and used == previous_path(path)
    assert str(path) in warning and str(previous_path(path)) in warning and "truncated" in warning


# ----------------------------------------------------------------------------- the CLI

TRAIN = ["train", "--data", "digits", "--limit", "120", "--hidden", "10", "--steps", "8", "--batch-size", "16",
         "--checkpoint-every", "2", "--eval-every", "4", "--dtype", "float64", "--seed", "5", "--no-plots",
         "--json"]


def _one_error_line(capsys, argv, *phrases):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoothchain: error:") and "\n" not in err and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    return err


def test_resume_refuses_bad_checkpoints_and_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*TRAIN, "--out", str(out)]) == 0
    capsys.readouterr()
    ck = out / "checkpoint.pt"
    # options that change the model or the optimizer: every one listed, old -> new
    err = _one_error_line(capsys, [*TRAIN, "--out", str(out), "--resume", "--hidden", "12", "--lr", "0.3"],
                          str(ck), "--hidden 10 -> 12", "--lr 1 -> 0.3", "--overwrite")
    assert "--steps" not in err
    # harmless ones pass: more steps, another evaluation period
    assert cli.main([*TRAIN, "--out", str(out), "--resume", "--steps", "10", "--eval-every", "5"]) == 0
    capsys.readouterr()
    _one_error_line(capsys, [*TRAIN, "--out", str(out), "--resume", "--steps", "4"], "beyond --steps 4")
    _one_error_line(capsys, [*TRAIN, "--out", str(out), "--resume", "--overwrite"], "exclude")
    # a damaged latest checkpoint: resumed from the previous one, with a warning naming both
    ck.write_bytes(ck.read_bytes()[:-7])
    assert cli.main([*TRAIN, "--out", str(out), "--resume", "--steps", "12"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("smoothchain: warning:")]
    assert len(warning) == 1 and str(ck) in warning[0] and str(previous_path(ck)) in warning[0]
    assert read_checkpoint(ck)["step"] == 12
    # both unusable: one error line
    for p in (ck, previous_path(ck)):
        p.write_bytes(b"garbage")
    _one_error_line(capsys, [*TRAIN, "--out", str(out), "--resume"], "not a smoothchain checkpoint",
                    "without --resume")
    # a checkpoint carrying code
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({**PAYLOAD, "model": _RunsCode(str(marker))}, buf)
    ck.write_bytes(_framed(buf.getvalue()))
    previous_path(ck).unlink()
    _one_error_line(capsys, [*TRAIN, "--out", str(out), "--resume"], str(ck), "could run code")
    assert not marker.exists()


def test_out_paths_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    _one_error_line(capsys, [*TRAIN, "--out", str(a_file)], str(a_file), "is a file")
    _one_error_line(capsys, [*TRAIN, "--out", str(a_file / "sub")], "not a directory")
    assert a_file.read_text() == "keep me"
    run = tmp_path / "run"
    assert cli.main([*TRAIN, "--out", str(run)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _one_error_line(capsys, [*TRAIN, "--out", str(run), "--seed", "6"], "holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written
    _one_error_line(capsys, [*TRAIN, "--out", str(tmp_path / "none"), "--resume"], "no checkpoint")
    assert not (tmp_path / "none").exists()
    # --overwrite replaces the run, previous checkpoint included
    assert cli.main([*TRAIN, "--out", str(run), "--seed", "6", "--overwrite", "--steps", "2",
                     "--checkpoint-every", "5"]) == 0
    capsys.readouterr()
    assert read_checkpoint(run / "checkpoint.pt")["config"]["seed"] == 6
    assert not previous_path(run / "checkpoint.pt").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- SIGKILL

KILLER = """
import os, signal, sys
from smoothchain import checkpoint, cli, train

kind, at = os.environ["KILL_KIND"], int(os.environ["KILL_AT"])
steps, writes = [0], [0]
real_step, real_write = train._train_step, checkpoint._write


def step(*args):  # killed inside a step: its update done in memory, nothing of it on disk
    out = real_step(*args)
    steps[0] += 1
    if kind == "step" and steps[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return out


def write(tmp, header, data):  # killed half-way through writing a checkpoint
    writes[0] += 1
    if kind == "write" and writes[0] == at:
        with open(tmp, "wb") as fh:
            fh.write(header + data[: len(data) // 2])
            fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(tmp, header, data)


train._train_step, checkpoint._write = step, write
sys.exit(cli.main(sys.argv[1:]))
"""

RUNS = {
    "dsgd-q1": ["--optimizer", "dsgd", "--q", "1"],
    "dsgd-q2": ["--optimizer", "dsgd", "--q", "2"],
    "dsgd-qinf": ["--optimizer", "dsgd", "--q", "inf"],
    "sgd": ["--optimizer", "sgd", "--lr", "0.5"],
    "gauss-newton": ["--optimizer", "gauss-newton"],
}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", list(RUNS))
def test_sigkilled_runs_resume_bit_for_bit(tmp_path, capsys, name):
    args = [*TRAIN, "--steps", "16", "--checkpoint-every", "3", *RUNS[name]]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert cli.main([*args, "--out", str(ref)]) == 0
    capsys.readouterr()
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    rng = random.Random(name)  # kill points drawn per optimizer, reproducibly
    kills = [("step", rng.randint(2, 6)), ("write", rng.randint(1, 2)), ("step", rng.randint(1, 4))]
    for i, (kind, at) in enumerate(kills):
        extra = ["--resume"] if i else []
        proc = subprocess.run([sys.executable, str(script), *args, "--out", str(killed), *extra],
                              env={**os.environ, "KILL_KIND": kind, "KILL_AT": str(at)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, (kind, at, proc.stderr[-2000:])
    assert cli.main([*args, "--out", str(killed), "--resume"]) == 0
    capsys.readouterr()
    a, b = read_checkpoint(ref / "checkpoint.pt"), read_checkpoint(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == 16
    for key in ("model", "optimizer", "rng", "metrics", "counts"):
        assert _same(a[key], b[key]), key
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert lines == [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert not list(Path(killed).glob("*.tmp"))
