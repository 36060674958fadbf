"""``batchnorm lab``: run an experiment and point at its report."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..lab.i18n import LANGUAGES, Translator, default_language, translator
from ..lab.models import ARCHS


def _positive_int(t: Translator):
    def positive_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(t("cli.positive_int", value=repr(text))) from None
        if value < 1:
            raise argparse.ArgumentTypeError(t("cli.positive_int", value=value))
        return value
    return positive_int


def _positive_float(t: Translator):
    def positive_float(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(t("cli.positive_float", value=repr(text))) from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(t("cli.positive_float", value=text))
        return value
    return positive_float


def add_parser(sub, t: Translator) -> None:
    """Add ``lab`` to ``sub``, its help and its usage errors in ``t``'s language."""
    from ..lab.experiments import EXPERIMENTS

    lines = "\n".join(f"  {name:<15} {e.describe(t.lang)}" for name, e in EXPERIMENTS.items())
    p = sub.add_parser(
        "lab", help=t("cli.lab_help"), description=t("cli.lab_description"),
        epilog=t("cli.lab_epilog", experiments=lines),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    h = {key.rsplit(".", 1)[-1]: text for key, text in t.messages.items()
         if key.startswith("cli.help.")}
    p.add_argument("experiment", choices=[*EXPERIMENTS, "list"], metavar="EXPERIMENT",
                   help=h["experiment"])
    p.add_argument("--dataset", choices=["mnist5k", "mnist", "fashion-mnist", "cifar10"],
                   help=h["dataset"])
    p.add_argument("--data-root", help=h["data_root"])
    p.add_argument("--out", default="runs", help=h["out"])
    p.add_argument("--device", default="cpu", help=h["device"])
    p.add_argument("--seed", type=int, default=0, help=h["seed"])
    p.add_argument("--epochs", type=_positive_int(t), help=h["epochs"])
    p.add_argument("--steps", type=_positive_int(t), help=h["steps"])
    p.add_argument("--batch-size", type=_positive_int(t), help=h["batch_size"])
    p.add_argument("--lr", type=_positive_float(t), help=h["lr"])
    p.add_argument("--arch", choices=ARCHS, help=h["arch"])
    p.add_argument("--quick", action="store_true", help=h["quick"])
    p.add_argument("--json", action="store_true", help=h["json"])
    p.add_argument("--no-progress", action="store_true", help=h["no_progress"])
    default = default_language()
    p.add_argument("--lang", choices=LANGUAGES, default=default,
                   help=t("cli.help.lang", default=default))


def run(args) -> int:
    from ..lab.experiments import EXPERIMENTS
    from ..lab.report import format_summary_table
    from ..lab.runner import LabConfig, run_experiment

    t = translator(args.lang)
    if args.experiment == "list":
        for name, e in EXPERIMENTS.items():
            print(f"{name:<15} {e.describe(t.lang)}")
        return 0
    config = LabConfig(
        experiment=args.experiment, dataset=args.dataset, data_root=args.data_root,
        out=args.out, device=args.device, seed=args.seed, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, arch=args.arch, quick=args.quick,
        progress=not (args.no_progress or args.json), lang=args.lang)
    result, report = run_experiment(config)
    if args.json:
        # Machine output: the summary's keys and text values are English whatever --lang.
        json.dump({"experiment": result.experiment, "lang": result.lang,
                   "summary": result.summary, "notes": result.notes, "report": str(report),
                   "seconds": result.seconds},
                  sys.stdout, indent=1, default=str)
        print()
        return 0
    print(f"\n{result.title}\n")
    print(format_summary_table(result.summary, display=result.display, lang=result.lang))
    for note in result.notes:
        print(f"\n* {note}")
    print("\n" + t("cli.report", path=report, seconds=result.seconds))
    return 0
