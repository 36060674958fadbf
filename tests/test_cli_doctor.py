"""``batchnorm doctor``: exit codes, the environment block, JSON, factories, clear errors."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from batchnorm.cli import main

FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    def clean(bias=False):
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def with_optimizer():
        model = clean()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)

    def trained():
        model = clean()
        with torch.no_grad():
            for _ in range(10):
                model(torch.randn(32, 3, 8, 8))
        return model.eval()

    def raises():
        raise RuntimeError("no weights here")

    def not_a_model():
        return 42

    NOT_CALLABLE = 3
""")


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "doctor_factories.py"
    path.write_text(FACTORIES)
    return str(path)


def doctor_cli(capsys, *args):
    code = main(["doctor", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_clean_model_exits_0_with_the_environment_block(capsys, factories):
    code, out, err = doctor_cli(capsys, f"{factories}:clean", "--input-shape", "16,3,8,8")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "Environment (paste it into a bug report):"
    block = dict(line.split(None, 1) for line in lines[1:lines.index("")])
    assert block["command"] == f"batchnorm doctor {factories}:clean --input-shape 16,3,8,8"
    assert block["torch"] == torch.__version__ and block["batchnorm"] == "0.1.0"
    assert block["threads"] == str(torch.get_num_threads())
    assert {"python", "platform", "numpy", "cuda"} <= set(block)
    assert block["input"].startswith("float32 (16, 3, 8, 8) on cpu, random")
    assert "batchnorm doctor: no findings (1 BN layer, data flow from torch.fx" in out


def test_warnings_exit_0_and_errors_exit_1(capsys, factories):
    code, out, _ = doctor_cli(capsys, f"{factories}:clean", "--input-shape", "16,3,8,8",
                              "--kwargs", '{"bias": true}')
    assert code == 0 and "warning BN001 bias right before batch norm" in out
    code, out, _ = doctor_cli(capsys, f"{factories}:clean", "--input-shape", "16,3,8,8", "--eval")
    assert code == 1
    assert "error BN011 training mode at evaluation" in out and "error BN008" in out
    code, out, _ = doctor_cli(capsys, f"{factories}:trained", "--input-shape", "16,3,8,8",
                              "--eval")
    assert code == 0 and "no findings" in out


def test_json_for_machines(capsys, factories):
    code, out, _ = doctor_cli(capsys, f"{factories}:with_optimizer", "--input-shape", "4,3,8,8",
                              "--input-scale", "64", "--input-offset", "128", "--json")
    data = json.loads(out)
    assert set(data) == {"command", "factory", "input", "environment", "report"}
    assert data["factory"] == f"{factories}:with_optimizer"
    assert data["input"] == {"description": "float32 (4, 3, 8, 8) on cpu",
                             "source": "random, 128 + 64 * N(0, 1), seed 0"}
    assert data["environment"]["torch"] == torch.__version__
    report = data["report"]
    assert {f["code"] for f in report["findings"]} == {"BN006", "BN007", "BN014"}
    assert report["ok"] is True and code == 0 and report["mode"] == "train"
    assert report["counts"] == {"error": 0, "warning": 3, "info": 0}
    code, out, _ = doctor_cli(capsys, f"{factories}:with_optimizer", "--input-shape", "4,3,8,8",
                              "--input-scale", "64", "--json", "--ignore", "bn006,BN014",
                              "--min-batch", "2")
    assert [f["code"] for f in json.loads(out)["report"]["findings"]] == ["BN007"]


def test_input_from_a_file(capsys, factories, tmp_path):
    batch = torch.randn(8, 3, 8, 8) * 50
    torch.save(batch, tmp_path / "batch.pt")
    code, out, _ = doctor_cli(capsys, f"{factories}:trained", "--input",
                              str(tmp_path / "batch.pt"), "--eval", "--json")
    report = json.loads(out)["report"]
    assert {f["code"] for f in report["findings"]} == {"BN007", "BN010"} and code == 0
    torch.save((batch / 50,), tmp_path / "args.pt")
    code, out, _ = doctor_cli(capsys, f"{factories}:trained", "--input",
                              str(tmp_path / "args.pt"), "--dtype", "float64")
    assert code == 0 and "float64 (8, 3, 8, 8)" in out and "no findings" in out


def test_importable_module_form(capsys, factories, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = doctor_cli(capsys, "doctor_factories:clean", "--input-shape", "16,3,8,8")
    assert code == 0 and "no findings" in out


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:build", "cannot import the factory 'no_such_module_xyz:build': "
                                 "no module named 'no_such_module_xyz'"),
    ("json:no_such_function", "'json' has no attribute 'no_such_function'"),
    ("{file}:missing", "has no attribute 'missing'"),
    ("{file}:raises", "raised RuntimeError: no weights here"),
    ("{file}:not_a_model", "returned int, not a torch.nn.Module"),
    ("{file}:NOT_CALLABLE", "is a int, not a callable"),
    ("{dir}/absent.py:build", "no file"),
])
def test_a_factory_that_cannot_be_used_is_one_clear_line(capsys, factories, tmp_path, spec,
                                                         message):
    spec = spec.format(file=factories, dir=tmp_path)
    code, out, err = doctor_cli(capsys, spec, "--input-shape", "4,3,8,8")
    assert code == 1 and out == ""
    assert err.startswith("batchnorm: error: ") and err.count("\n") == 1, err
    assert message in err


def test_a_module_that_fails_to_import_names_the_error(capsys, tmp_path):
    (tmp_path / "broken.py").write_text("import torch\nraise ImportError('needs CUDA 99')\n")
    code, _, err = doctor_cli(capsys, f"{tmp_path}/broken.py:build", "--input-shape", "4,3")
    assert code == 1 and "importing" in err and "needs CUDA 99" in err


def test_a_model_that_fails_on_the_input(capsys, factories):
    code, _, err = doctor_cli(capsys, f"{factories}:clean", "--input-shape", "4,5,8,8")
    assert code == 1 and "the model failed on the example input" in err


@pytest.mark.parametrize("args, message", [
    (["x:clean", "--input-shape", "8,3,a"], "expected comma-separated positive integers"),
    (["x:clean", "--input-shape", "8,0,4"], "expected comma-separated positive integers"),
    (["x:clean", "--input-shape", ""], "expected comma-separated positive integers"),
    (["no_colon", "--input-shape", "8,3"], "expected MODULE:FUNCTION"),
    (["x:", "--input-shape", "8,3"], "expected MODULE:FUNCTION"),
    (["x:clean"], "one of the arguments --input-shape --input is required"),
    (["x:clean", "--input-shape", "8,3", "--input", "a.pt"], "not allowed with argument"),
    (["x:clean", "--input-shape", "8,3", "--ignore", "BN999"], "unknown check code(s) BN999"),
    (["x:clean", "--input-shape", "8,3", "--kwargs", "[1]"], "expected a JSON object"),
    (["x:clean", "--input-shape", "8,3", "--kwargs", "{bad"], "not valid JSON"),
    (["x:clean", "--input-shape", "8,3", "--input-scale", "nan"], "expected a finite number"),
    (["x:clean", "--input-shape", "8,3", "--per-device-batch", "0"], "positive integer"),
    (["x:clean", "--input-shape", "8,3", "--eval", "--train"], "not allowed with argument"),
])
def test_usage_errors_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["doctor", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_ends_with_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["doctor", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "examples:" in out and "--input-shape" in out


def test_the_command_exit_codes(factories):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "batchnorm", "doctor", *args],
                              capture_output=True, text=True, check=False)

    done = run(f"{factories}:clean", "--input-shape", "16,3,8,8", "--eval", "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["report"]["ok"] is False
    done = run(f"{factories}:clean", "--input-shape", "16,3,8,8")
    assert done.returncode == 0 and "no findings" in done.stdout
