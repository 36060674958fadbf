"""The ``batchnorm`` command: thin wrappers over library functions.

Commands parse arguments, call a function that returns data, and render it.
Known errors become one clear line on stderr (``BATCHNORM_DEBUG=1`` shows the
traceback). Exit codes: 0 ok, 1 failure, 2 usage.

Texts are in the language of ``batchnorm lab --lang`` when the command line
names one, else the locale's (:func:`batchnorm.lab.i18n.default_language`):
the help, our usage errors, the lab's output and the interrupted/error lines.
Argparse's own words ("usage:", "invalid choice") and the data loaders'
messages stay English.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..lab.i18n import LANGUAGES, default_language, translator
from . import doctor as doctor_cmd
from . import lab as lab_cmd


def build_parser(lang: str | None = None) -> argparse.ArgumentParser:
    """The ``batchnorm`` parser, its help in ``lang`` (default: the locale's)."""
    from .. import __version__

    t = translator(lang or default_language())
    parser = argparse.ArgumentParser(
        prog="batchnorm", description=t("cli.description"), epilog=t("cli.epilog"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help=t("cli.info_help"))
    lab_cmd.add_parser(sub, t)
    doctor_cmd.add_parser(sub, t)
    return parser


def _language(argv: list[str]) -> str:
    """The ``--lang`` named on the command line if it is one we have, else the locale's."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        value = (argv[i + 1] if arg == "--lang" and i + 1 < len(argv)
                 else arg.partition("=")[2] if arg.startswith("--lang=") else None)
        if value in LANGUAGES:
            return value
    return default_language()


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
    argv = sys.argv[1:] if argv is None else list(argv)
    t = translator(_language(argv))
    parser = build_parser(t.lang)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info()
        if args.command == "lab":
            return lab_cmd.run(args)
        if args.command == "doctor":
            return doctor_cmd.run(args, argv)
    except KeyboardInterrupt:
        print(t("cli.interrupted"), file=sys.stderr)
        return 130
    except Exception as err:  # one clear line for known errors
        if os.environ.get("BATCHNORM_DEBUG") or not _known(err):
            raise
        print(t("cli.error", message=err), file=sys.stderr)
        return 1
    parser.print_help(sys.stderr)
    return 2


def _known(err: Exception) -> bool:
    from ..lab.data import DataError

    return isinstance(err, (DataError, ValueError, RuntimeError, OSError))
