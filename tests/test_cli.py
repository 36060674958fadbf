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
