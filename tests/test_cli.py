"""The command line: DESIGN.md's JSON contract, the human table, errors, the VGG study."""

from __future__ import annotations

import os
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from smoothchain import certify
from smoothchain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def _num(x):
    return math.inf if x == "inf" else x


def test_certify_json_contract(capsys):
    doc = run_json(capsys, "certify", "--model", "vgg16-smooth", "--batch-size", "128", "--radius", "1",
                   "--input-norm", "1", "--constants", "paper", "--json")
    assert set(doc) >= {"layers", "chain", "objective"}
    assert len(doc["layers"]) == 16
    assert [r["index"] for r in doc["layers"]] == list(range(1, 17))
    for row in doc["layers"]:
        assert set(row) == {"index", "name", "output_bound", "lipschitz", "smoothness"}
    assert set(doc["chain"]) == {"output_bound", "lipschitz", "smoothness"}
    assert set(doc["objective"]) == {"loss_lipschitz", "loss_smoothness", "smoothness", "step_size", "iterations"}
    # the chain entry is the last layer's row, and the library agrees
    last = doc["layers"][-1]
    assert doc["chain"] == {k: last[k] for k in ("output_bound", "lipschitz", "smoothness")}
    cert = certify("vgg16-smooth", batch_size=128)
    assert doc["chain"]["lipschitz"] == cert.bounds.lipschitz
    obj = doc["objective"]
    assert obj["step_size"] == pytest.approx(1 / obj["smoothness"], rel=1e-12)
    # VGG ends with a softmax over 1000 classes: m_psi = sqrt(m) in paper mode
    assert doc["chain"]["output_bound"] == pytest.approx(math.sqrt(128), rel=1e-12)


def test_infinite_values_are_the_string_inf(capsys):
    doc = run_json(capsys, "certify", "--model", "vgg16", "--batch-size", "4", "--json")
    assert doc["chain"]["smoothness"] == "inf"  # ReLU and max pooling are not C^1
    assert doc["objective"]["step_size"] == 0.0
    assert doc["objective"]["iterations"] == "inf"
    assert isinstance(doc["chain"]["lipschitz"], float)


def test_json_prints_only_json(capsys):
    assert main(["certify", "--model", "mlp", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)


def test_table_output(capsys):
    assert main(["certify", "--model", "cnn", "--batch-size", "4", "--constants", "tight"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "softplus, avgpool" in out and "step size" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["certify", "--model", "mlp", "--radius", "-1"], "must be >= 0"),
        (["certify", "--model", "nope"], "invalid choice"),
        (["certify", "--model", "mlp", "--batch-size", "0"], "must be >= 1"),
        (["certify", "--model", "mlp", "--spec", "x.json"], "not allowed with"),
        (["certify"], "one of the arguments"),
        (["certify", "--model", "mlp", "--radius", "nan"], "NaN"),
    ],
)
def test_argument_errors_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoothchain: error:") and "\n" not in err
    return err


def test_malformed_spec_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": [{"bilinear": {"smoothness": -1, "weight_lipschitz": 0, '
                   '"input_lipschitz": 0, "offset_norm": 0}}], "loss": {"lipschitz": 1, "smoothness": 1}}')
    assert "layers[1].bilinear.smoothness" in _error(capsys, "certify", "--spec", str(bad))
    bad.write_text("{not json")
    assert "not valid JSON" in _error(capsys, "certify", "--spec", str(bad))
    assert "not found" in _error(capsys, "certify", "--spec", str(tmp_path / "missing.json"))


def test_module_errors(tmp_path, capsys):
    assert "not found" in _error(capsys, "certify", "--module", str(tmp_path / "none.py:make"))
    assert "FILE.py:FACTORY" in _error(capsys, "certify", "--module", "nofactory")
    f = tmp_path / "m.py"
    f.write_text("import torch.nn as nn\n"
                 "def good():\n    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))\n"
                 "def bad():\n    return nn.Sequential(nn.Linear(4, 3), nn.GELU())\n"
                 "def notmodule():\n    return 3\n")
    assert "no callable 'missing'" in _error(capsys, "certify", "--module", f"{f}:missing")
    assert "not a torch.nn.Module" in _error(capsys, "certify", "--module", f"{f}:notmodule", "--input-shape", "4")
    err = _error(capsys, "certify", "--module", f"{f}:bad", "--input-shape", "4")
    assert "GELU" in err and "register_module" in err
    err = _error(capsys, "certify", "--module", f"{f}:good", "--input-shape", "5")
    assert "'0'" in err and "--input-shape" in err
    assert "needs --input-shape" in _error(capsys, "certify", "--module", f"{f}:good")
    doc = run_json(capsys, "certify", "--module", f"{f}:good", "--input-shape", "4", "--batch-size", "3", "--json")
    assert [r["name"] for r in doc["layers"]] == ["0", "2"]


def test_user_module_matches_library(tmp_path, capsys):
    import torch.nn as nn

    f = tmp_path / "net.py"
    f.write_text("import torch.nn as nn\n"
                 "def make():\n    return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid()),\n"
                 "        nn.Flatten(), nn.Linear(4 * 6 * 6, 10), nn.Softmax(dim=1))\n")
    doc = run_json(capsys, "certify", "--module", f"{f}:make", "--input-shape", "1,8,8", "--batch-size", "5",
                   "--constants", "tight", "--json")
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid()), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10), nn.Softmax(dim=1))
    cert = certify(model, input_shape=(1, 8, 8), batch_size=5, mode="tight")
    assert doc["chain"]["smoothness"] == pytest.approx(cert.bounds.smoothness, rel=1e-12)


def test_save_spec_round_trip(tmp_path, capsys):
    spec = tmp_path / "cnn.json"
    a = run_json(capsys, "certify", "--model", "cnn", "--batch-size", "8", "--constants", "tight",
                 "--save-spec", str(spec), "--json")
    b = run_json(capsys, "certify", "--spec", str(spec), "--json")
    assert b["layers"] == a["layers"] and b["chain"] == a["chain"]
    assert b["objective"]["smoothness"] == pytest.approx(a["objective"]["smoothness"], rel=1e-12)
    # command-line radius overrides the file's
    c = run_json(capsys, "certify", "--spec", str(spec), "--radius", "2", "--json")
    assert _num(c["chain"]["lipschitz"]) > _num(a["chain"]["lipschitz"])


def test_save_spec_write_failure_still_prints_the_certificate(tmp_path, capsys, monkeypatch):
    """The disk fails after the work (the path was fine when checked): the certificate is still
    printed, then one error line, exit 2, and no spec file is left."""
    import errno

    import smoothchain.report as report

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_text", full_disk)
    spec = tmp_path / "cnn.json"
    assert main(["certify", "--model", "cnn", "--save-spec", str(spec), "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["chain"]["smoothness"] is not None
    assert err.strip().splitlines() == [f"smoothchain: error: --save-spec {spec}: could not write it (No space left "
                                        "on device); the certificate is printed above"]
    assert not spec.exists()


def test_around_weights_requires_weight_norms_in_spec(capsys):
    err = _error(capsys, "certify", "--spec", str(ROOT / "examples" / "spec.json"), "--around-weights")
    assert "weight_norm" in err


def test_vgg_study_writes_report_and_claims_hold(tmp_path, capsys):
    doc = run_json(capsys, "vgg-study", "--out", str(tmp_path), "--json")
    assert len(doc["claims"]) == 10
    failed = [c for c in doc["claims"] if not c["holds"]]
    assert not failed, failed
    for kind in ("markdown", "png", "json"):
        assert Path(doc["files"][kind]).is_file()
    png = Path(doc["files"]["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = Path(doc["files"]["markdown"]).read_text()
    assert "| vgg16-bn (eps=0.01) | paper |" in md and "vgg_study.png" in md


def test_vgg_study_local_rows_join_the_report(tmp_path, capsys, monkeypatch):
    """`--local zero,init` adds local_vgg_rows' rows (stubbed here: the certificate itself is
    tests/test_local.py's and benchmarks/vgg_local.py's) to the table, the JSON and the chart;
    the claims stay those of paper and tight."""
    from smoothchain import vgg_study

    calls = []

    def rows(*, batch_size, radius, input_norm, seed, centre):
        calls.append((batch_size, radius, input_norm, centre))
        mode_rows = [("tight", 9e26)] if centre == "init" else []
        return tuple(vgg_study.StudyRow(f"vgg16-smooth @ {centre}", None, mode, 1.0, 2.0, value, value)
                     for mode, value in mode_rows + [("local", 3e16)])

    monkeypatch.setattr(vgg_study, "local_vgg_rows", rows)
    doc = run_json(capsys, "vgg-study", "--out", str(tmp_path), "--local", "zero,init", "--batch-size", "4", "--json")
    assert calls == [(4, 1.0, 1.0, "zero"), (4, 1.0, 1.0, "init")]
    assert [r["mode"] for r in doc["rows"]][-3:] == ["local", "tight", "local"] and len(doc["claims"]) == 10
    md = Path(doc["files"]["markdown"]).read_text()
    assert "| vgg16-smooth @ zero | local |" in md and "| vgg16-smooth @ init | tight |" in md
    assert Path(doc["files"]["png"]).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exc:
        main(["vgg-study", "--out", str(tmp_path), "--local", "origin"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "zero, init" in err and "origin" in err


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "smoothchain", "certify", "--model", "mlp", "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    assert json.loads(out.stdout)["layers"][0]["name"] == "fc1"


def test_certify_builtin_does_not_import_torch():
    code = ("import sys; from smoothchain.cli import main; "
            "main(['certify','--model','vgg16-smooth','--batch-size','128','--json']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)


def test_missing_optional_dependency_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    """Without scikit-learn (the "data" extra) a command on digits fails with one line naming it."""
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["train", "--data", "digits", "--steps", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "scikit-learn" in err and "smoothchain[data]" in err


def test_certify_spec_does_not_import_torch():
    code = ("import sys; from smoothchain.cli import main; "
            f"main(['certify','--spec',{str(ROOT / 'examples' / 'spec.json')!r},'--json']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)


def test_subcommand_modules_do_not_import_the_cli_entry_point():
    """No import cycle: subcommand modules import from cli.common / cli.options and the library only."""
    import ast

    cli_dir = ROOT / "smoothchain" / "cli"
    for path in cli_dir.glob("*.py"):
        if path.name in ("__init__.py", "main.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                names = {a.name for a in node.names}
                assert target not in (".", ".main", "smoothchain.cli", "smoothchain.cli.main"), (path.name, target)
                assert not (target in ("..", "smoothchain") and "cli" in names), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("smoothchain.cli") for a in node.names), path.name


def test_around_weights_is_seeded_without_touching_the_global_rng(capsys):
    torch = pytest.importorskip("torch")
    from smoothchain.models import builtin
    from smoothchain.torch_chain import torch_module

    state = torch.get_rng_state()
    argv = ["certify", "--model", "cnn", "--around-weights", "--batch-size", "2", "--json"]
    a, b = (run_json(capsys, *argv, "--seed", "3") for _ in range(2))
    c = run_json(capsys, *argv, "--seed", "4")
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a["layers"] != c["layers"]
    spec = builtin("cnn")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # the weights are PyTorch's default initialisation after seeding with 3
        module = torch_module(spec.components, spec.names)
    ref = certify(module, input_shape=spec.input_shape, batch_size=2, around_weights=True)
    assert a["chain"]["lipschitz"] == ref.bounds.lipschitz and a["settings"]["model"] == "cnn"


def test_seeded_module_is_default_initialisation_from_a_private_generator():
    torch = pytest.importorskip("torch")
    from smoothchain.certificate import seeded_module
    from smoothchain.models import builtin
    from smoothchain.torch_chain import torch_module

    state = torch.get_rng_state()
    got = seeded_module("vgg16-bn", seed=5, bn_eps=1e-2).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    spec = builtin("vgg16-bn", bn_eps=1e-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ref = torch_module(spec.components, spec.names).state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_certify_source_matches_the_command(capsys, tmp_path):
    from smoothchain.certificate import certify_source
    from smoothchain.chain import ChainError

    doc = run_json(capsys, "certify", "--model", "mlp", "--batch-size", "3", "--loss", "square", "--l2", "0.5", "--json")
    assert certify_source("mlp", batch_size=3, loss="square", l2=0.5).to_dict() == doc
    spec = ROOT / "examples" / "spec.json"
    doc = run_json(capsys, "certify", "--spec", str(spec), "--radius", "2", "--json")
    cert = certify_source(spec=spec, radius=2)
    assert cert.to_dict() == doc and cert.mode == "spec"
    with pytest.raises(ChainError, match="exactly one"):
        certify_source("mlp", spec=spec)


# --------------------------------------------------------------------------- --threads
def test_threads_option_sets_torch_threads_for_the_command_only(monkeypatch, capsys):
    """--threads N: the handler runs with N PyTorch threads; the setting is restored after."""
    import torch

    from smoothchain.cli import main as cli_main
    from smoothchain.cli import common

    seen = []
    real = common.torch_threads

    def spy(requested):
        ctx = real(requested)

        class Wrap:
            def __enter__(self):
                n = ctx.__enter__()
                seen.append((n, torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")))
                return n

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)
        return Wrap()

    monkeypatch.setattr(sys.modules["smoothchain.cli.main"], "torch_threads", spy)
    before = torch.get_num_threads()
    assert cli_main(["certify", "--model", "mlp", "--threads", "1", "--json"]) == 0
    capsys.readouterr()
    assert seen == [(1, 1, "1")]
    assert torch.get_num_threads() == before


def test_default_threads_honour_omp_affinity_and_ranks(monkeypatch):
    from smoothchain.cli.common import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_threads() == 1


def test_certify_with_threads_still_imports_no_torch():
    code = ("import sys; from smoothchain.cli import main; "
            "assert main(['certify', '--model', 'mlp', '--threads', '2', '--json']) == 0; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
