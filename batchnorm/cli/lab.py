"""``batchnorm lab``: run an experiment and point at its report."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..lab.models import ARCHS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_parser(sub) -> None:
    from ..lab.experiments import EXPERIMENTS

    lines = "\n".join(f"  {name:<15} {e.description}" for name, e in EXPERIMENTS.items())
    p = sub.add_parser(
        "lab", help="train small networks with and without BN and write a report",
        description="Run one of the lab's experiments and write a report with plots.",
        epilog=f"experiments:\n{lines}\n\nexamples:\n  batchnorm lab compare\n"
               "  batchnorm lab batch-size --quick\n"
               "  batchnorm lab paper-mnist --data-root .cache/mnist\n"
               "  batchnorm lab compare --device cuda --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*EXPERIMENTS, "list"], metavar="EXPERIMENT",
                   help="an experiment name, or 'list'")
    p.add_argument("--dataset", choices=["mnist5k", "mnist", "fashion-mnist", "cifar10"],
                   help="data set (default: the experiment's; mnist5k ships with the install)")
    p.add_argument("--data-root", help="folder with the data set's files (make data: .cache/mnist)")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--epochs", type=_positive_int, help="epochs per run")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps per run (over --epochs)")
    p.add_argument("--batch-size", type=_positive_int, help="mini-batch size")
    p.add_argument("--lr", type=_positive_float, help="learning rate")
    p.add_argument("--arch", choices=ARCHS, help="network")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..lab.experiments import EXPERIMENTS
    from ..lab.report import format_summary_table
    from ..lab.runner import LabConfig, run_experiment

    if args.experiment == "list":
        for name, e in EXPERIMENTS.items():
            print(f"{name:<15} {e.description}")
        return 0
    config = LabConfig(
        experiment=args.experiment, dataset=args.dataset, data_root=args.data_root,
        out=args.out, device=args.device, seed=args.seed, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, arch=args.arch, quick=args.quick,
        progress=not (args.no_progress or args.json))
    result, report = run_experiment(config)
    if args.json:
        json.dump({"experiment": result.experiment, "summary": result.summary,
                   "notes": result.notes, "report": str(report), "seconds": result.seconds},
                  sys.stdout, indent=1, default=str)
        print()
        return 0
    print(f"\n{result.title}\n")
    print(format_summary_table(result.summary))
    for note in result.notes:
        print(f"\n* {note}")
    print(f"\nreport: {report}  ({result.seconds:.1f} s)")
    return 0
