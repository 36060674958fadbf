"""The ``batchnorm`` command: entry points and exit codes."""

import subprocess
import sys

from batchnorm import __version__
from batchnorm.cli import main


def test_info_names_the_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"batchnorm {__version__}" in out and "cpu: backend" in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: batchnorm" in capsys.readouterr().err


def test_python_dash_m_runs():
    done = subprocess.run([sys.executable, "-m", "batchnorm", "--version"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"batchnorm {__version__}"


def _lab(*args):
    return subprocess.run([sys.executable, "-m", "batchnorm", "lab", *args], capture_output=True,
                          text=True, check=False)


def test_lab_list_names_every_experiment(capsys):
    from batchnorm.lab.experiments import EXPERIMENTS

    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS) and len(EXPERIMENTS) == 9


def test_lab_usage_errors_exit_2(capsys):
    import pytest

    cases = [(["lab", "nope"], "invalid choice: 'nope'"),
             (["lab", "compare", "--batch-size", "0"], "expected a positive integer, got 0"),
             (["lab", "compare", "--batch-size", "two"], "expected a positive integer"),
             (["lab", "compare", "--lr", "-0.1"], "expected a positive number"),
             (["lab", "compare", "--lr", "inf"], "expected a positive number")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_lab_missing_or_corrupt_data_folder_is_one_clear_line(tmp_path):
    done = _lab("paper-mnist", "--quick", "--data-root", str(tmp_path / "absent"),
                "--out", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.startswith("batchnorm: error:") and "absent" in done.stderr
    assert "Traceback" not in done.stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (corrupt / name).write_bytes(b"\x00\x00\x08\x03garbage")
    done = _lab("paper-mnist", "--quick", "--data-root", str(corrupt), "--out", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "batchnorm: error:" in done.stderr


def test_lab_runs_and_prints_json(tmp_path):
    import json

    done = _lab("compare", "--quick", "--json", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["experiment"] == "compare" and len(result["summary"]) == 2
    assert (tmp_path / "compare" / "report.html").exists()
    assert result["report"] == str(tmp_path / "compare" / "report.html")


def test_lab_prints_summary_and_report_path(tmp_path, capsys):
    assert main(["lab", "placement", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "BN before ReLU" in out and f"report: {tmp_path / 'placement' / 'report.html'}" in out
