"""One table of bad inputs across every command (issue 15, item 5): each row is the command
line, the exit status and phrases the message must contain; every row must print exactly one
line on stderr, no traceback, and write nothing (the working folder is compared before and
after).  Checkpoint damage and option mismatches of ``train --resume`` are in
tests/test_checkpoint.py."""

from __future__ import annotations

import contextlib
import io

import pytest

from smoothchain.cli import main

MODULES = '''
import torch


def lstm():
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LSTM(2, 2))


def boom():
    raise RuntimeError("boom")


def three():
    return 3


def small():
    return torch.nn.Sequential(torch.nn.Linear(3, 2))


class Skip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def skip():
    return Skip()


class Branchy(torch.nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def branchy():
    return Branchy()


class Plus1(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) + 1.0


def plus1():
    return Plus1()
'''

ROWS = [
    ("certify --model nope", "invalid choice: 'nope'"),
    ("certify --model mlp --radius -1", "--radius", ">= 0"),
    ("certify --model mlp --radius nan", "NaN"),
    ("certify --model mlp --batch-size 0", "--batch-size", ">= 1"),
    ("certify --model mlp --loss nope", "--loss"),
    ("certify --model mlp --epsilon 0", "--epsilon", "> 0"),
    ("certify --model mlp --constants local", "one batch", "check"),
    ("certify --spec {d}/missing.json", "not found", "missing.json"),
    ("certify --spec {d}/notjson.json", "not valid JSON"),
    ("certify --spec {d}/empty.json", "'layers'"),
    ("certify --module {d}/missing.py:f --input-shape 3", "not found", "missing.py"),
    ("certify --module {d}/plain.py:f --input-shape 3", "no callable 'f'"),
    ("certify --module {d}/mods.py:lstm --input-shape 3", "LSTM", "register"),
    ("certify --module {d}/mods.py:boom --input-shape 3", "boom"),
    ("certify --module {d}/mods.py:three --input-shape 3", "not a torch.nn.Module"),
    ("certify --module {d}/mods.py --input-shape 3", "FILE.py:FACTORY"),
    ("certify --model mlp --input-shape 3", "last dimension is 64"),
    ("certify --model mlp --save-spec {d}/afile/x.json", "--save-spec", "not a directory"),
    ("certify --model mlp --save-spec {d}/adir", "--save-spec", "is a directory"),
    ("check --model mlp --points 0", "--points"),
    ("check --model mlp --tolerance -1", "--tolerance"),
    ("check --model mlp --plot {d}/afile/c.png", "--plot", "not a directory"),
    ("check --spec {d}/empty.json", "needs a network"),
    ("pl --model mlp --data nope", "--data"),
    ("pl --model mlp --samples 0", "--samples"),
    ("pl --module {d}/mods.py:small --data digits", "does not take the inputs of --data digits", "(64,)"),
    ("pl --module {d}/mods.py:small --input-shape 3 --data digits", "64 inputs", "(3,)"),
    ("check --model mlp --budget 0", "--budget", "> 0"),
    ("check --module {d}/mods.py:skip --input-shape 3 --constants local --around-weights", "skip connections"),
    ("certify --module {d}/mods.py:branchy --input-shape 3", "cannot trace Branchy", "control flow"),
    ("certify --module {d}/mods.py:plus1 --input-shape 3", "has no rule", "docs/graphs.md"),
    ("check --model mlp --budget inf", "--budget", "finite"),
    ("train --nproc 0", "--nproc", ">= 1"),
    ("check --model mlp --threads 0", "--threads", ">= 1"),
    ("certify --model mlp --threads two", "--threads", "integer"),
    ("rates sgd", "required"),
    ("train --optimizer nope", "--optimizer"),
    ("train --steps -1", "--steps"),
    ("train --lr 0", "--lr"),
    ("train --q 3", "q must be 1, 2 or inf"),
    ("train --hidden 0", "--hidden"),
    ("train --checkpoint-every 0", "--checkpoint-every"),
    ("train --data {d}/adir --steps 1", "train-images-idx3-ubyte", "adir"),
    ("train --resume --steps 1", "--out"),
    ("train --out {d}/afile --steps 1", "is a file"),
    ("train --out {d}/afile/sub --steps 1", "not a directory"),
    ("train --out {d}/nothing --resume --steps 1", "no checkpoint"),
    ("train --batch-size 100000 --limit 50 --steps 1", "exceeds the 50 training examples"),
    ("train --optimizer certified-gd --radius 0 --steps 1", "--radius"),
    ("experiment nope", "invalid choice"),
    ("experiment dsgd --data nope --out {d}/exp", "unknown data set 'nope'"),
    ("experiment dsgd --qs 3", "--qs"),
    ("experiment dsgd --out {d}/afile", "--out", "is a file"),
    ("experiment prop21 --out {d}/afile/sub", "--out", "not a directory"),
    ("complexity --model mlp --batch-size 0", "--batch-size"),
    ("complexity --model nope", "--model"),
    ("vgg-study --batch-size 0", "--batch-size"),
    ("vgg-study --out {d}/afile", "--out", "is a file"),
    ("vgg-study --out {d}/v --local origin", "zero, init"),
]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir").mkdir()
    (tmp_path / "notjson.json").write_text("garbage")
    (tmp_path / "empty.json").write_text('{"layers": []}')
    (tmp_path / "plain.py").write_text("x = 1\n")
    (tmp_path / "mods.py").write_text(MODULES)
    monkeypatch.chdir(tmp_path)  # default output folders land here, and are checked too
    return tmp_path


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if "__pycache__" not in p.parts}


def test_the_table_is_long_enough():
    assert len(ROWS) >= 30


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gives_one_line(folder, row):
    command, *phrases = row
    argv = command.format(d=folder).split()
    before = _snapshot(folder)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (command, lines)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "error:" in lines[0]
    for phrase in phrases:
        assert phrase.format(d=folder) in lines[0], (phrase, lines[0])
    assert _snapshot(folder) == before, "a bad input wrote something"
