"""The ``batchnorm`` command."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization for PyTorch: the lab, the doctor, benchmarks.",
        epilog="examples:\n  batchnorm --version\n  batchnorm info",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions and the backend each device would use")
    return parser


def _info() -> int:
    import torch

    from . import __version__
    from ._backend import resolve_backend

    print(f"batchnorm {__version__}, torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        ops = resolve_backend("auto", torch.empty(0, device=dev))
        print(f"  {dev}: backend {ops.__name__.rsplit('.', 1)[-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    parser.print_help(sys.stderr)
    return 2
