"""The ``batchnorm`` command: thin wrappers over library functions.

Commands parse arguments, call a function that returns data, and render it.
Known errors become one clear line on stderr (``BATCHNORM_DEBUG=1`` shows the
traceback). Exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import lab as lab_cmd

EPILOG = """examples:
  batchnorm lab compare          # the demo: train with and without BN, write a report
  batchnorm lab list             # every experiment, one line each
  batchnorm info                 # versions and the backend each device uses
"""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization for PyTorch: the lab, and information on the backends.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions and the backend each device would use")
    lab_cmd.add_parser(sub)
    return parser


def _info() -> int:
    import torch

    from .. import __version__
    from .._backend import resolve_backend

    print(f"batchnorm {__version__}, torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        ops = resolve_backend("auto", torch.empty(0, device=dev))
        print(f"  {dev}: backend {ops.__name__.rsplit('.', 1)[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info()
        if args.command == "lab":
            return lab_cmd.run(args)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for known errors
        if os.environ.get("BATCHNORM_DEBUG") or not _known(err):
            raise
        print(f"batchnorm: error: {err}", file=sys.stderr)
        return 1
    parser.print_help(sys.stderr)
    return 2


def _known(err: Exception) -> bool:
    from ..lab.data import DataError

    return isinstance(err, (DataError, ValueError, RuntimeError, OSError))
