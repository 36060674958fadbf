"""What the experiments share: the registry, default sizes, curve figures, table rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ..train import RunResult

__all__ = ["CNN", "QUICK", "REGISTRY", "Experiment", "curve_figure", "defaults_for",
           "experiment", "run_row", "target_accuracy"]


@dataclass(frozen=True)
class Experiment:
    name: str
    fn: Callable[[Lab], ExperimentResult]
    description: str
    dataset: str = "mnist5k"


REGISTRY: dict[str, Experiment] = {}


def experiment(name: str, description: str, dataset: str = "mnist5k"):
    """Register ``fn(lab) -> ExperimentResult`` as ``batchnorm lab <name>``."""

    def register(fn):
        REGISTRY[name] = Experiment(name, fn, description, dataset)
        return fn
    return register


# The course CNN at a width that trains in seconds per epoch on 2 cores.
CNN = dict(arch="cnn", batch_size=64, lr=0.02, epochs=3, eval_every=20)
QUICK = dict(steps=12, epochs=0, eval_every=4, model_kwargs={"conv_filters": 4, "dense_units": 16})


def defaults_for(lab: Lab, base: dict, quick: dict | None = None) -> dict:
    d = dict(base)
    if lab.config.quick:
        d.update(QUICK)
        d.update(quick or {})
    return d


def target_accuracy(lab: Lab, full: float) -> float:
    return 0.5 if lab.config.quick else full


def curve_figure(runs: dict[str, RunResult], name="curves", title="Training curves",
                  caption="") -> Figure:
    loss, acc = [], []
    for label, r in runs.items():
        steps = [h["step"] for h in r.history]
        loss.append(Series(f"{label} (train)", steps, [h["train_loss"] for h in r.history],
                           dashed=True, group=label))
        loss.append(Series(f"{label} (validation)", steps, [h["val_loss"] for h in r.history],
                           group=label))
        acc.append(Series(label, steps, [h["val_acc"] for h in r.history]))
    return Figure(name, title, caption, [
        Panel("Loss", "training step", "cross-entropy loss", loss, logy=True),
        Panel("Validation accuracy", "training step", "accuracy", acc)])


def run_row(label: str, r: RunResult, target: float) -> dict:
    best = max((h["val_acc"] for h in r.history), default=0.0)
    return {
        "run": label,
        "final val acc": r.final.get("val_acc", 0.0),
        "best val acc": best,
        f"steps to {target:.0%}": r.steps_to(target),
        "final train loss": r.history[-1]["train_loss"] if r.history else None,
        "train seconds": r.history[-1]["seconds"] if r.history else None,
        "diverged": "yes" if r.diverged else "no",
    }


