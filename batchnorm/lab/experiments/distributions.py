"""Inside the network: how the input of a sigmoid moves during training (the BN paper's Fig. 1)."""

from __future__ import annotations

from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ..train import RunResult
from ._common import defaults_for, experiment

# The paper's MNIST network: 3 sigmoid layers of 100 units, mini-batches of 60.
PAPER = dict(arch="mlp", batch_size=60, lr=0.1, momentum=0.9)
LAYER = "sigmoid2"  # the last hidden layer's nonlinearity


def _percentile_series(label: str, r: RunResult) -> Series:
    rows = [row for row in r.extra.get("monitor", []) if row["layer"] == LAYER]
    return Series(label, [row["step"] for row in rows], [row["p50"] for row in rows],
                  lo=[row["p15"] for row in rows], hi=[row["p85"] for row in rows])


def _figures(runs: dict[str, RunResult], evaluated_on: str) -> list[Figure]:
    acc = [Series(label, [h["step"] for h in r.history], [h["val_acc"] for h in r.history])
           for label, r in runs.items()]
    bands = [Panel(f"Input to a sigmoid, {label}", "training step", "pre-activation value",
                   [_percentile_series(label, r)]) for label, r in runs.items()]
    return [
        Figure("accuracy", f"{evaluated_on.capitalize()} accuracy against training steps",
               f"The paper's Figure 1(a): {evaluated_on} accuracy of the 784-100-100-100-10 "
               "sigmoid network with and without BN.",
               [Panel(f"{evaluated_on.capitalize()} accuracy", "training step", "accuracy",
                      acc)]),
        Figure("sigmoid_input", "The input of a sigmoid in the last hidden layer over training",
               "The paper's Figure 1(b, c): the 15th, 50th and 85th percentiles (band and "
               "line) of the values entering one layer's sigmoids. Without BN the "
               "distribution drifts as the earlier layers change; with BN it stays put.",
               bands),
    ]


def _paper_runs(lab: Lab, defaults: dict, every: int) -> dict[str, RunResult]:
    monitor = dict(layers=[LAYER], what="input", every=every)
    return {label: lab.run(label, lab.train_config(defaults, norm=norm), monitor=monitor)
            for label, norm in (("BN", "batch"), ("no BN", "none"))}


def _drift(r: RunResult) -> float | None:
    rows = [row for row in r.extra.get("monitor", []) if row["layer"] == LAYER]
    if len(rows) < 2:
        return None
    return abs(rows[-1]["p50"] - rows[0]["p50"])


@experiment("distributions", "per-layer activation percentiles (15/50/85) over training, "
                             "with and without BN (the paper's Figure 1 b/c)")
def distributions(lab: Lab) -> ExperimentResult:
    base = dict(PAPER, steps=2000, epochs=0, eval_every=100)
    defaults = defaults_for(lab, base, quick={"steps": 40, "eval_every": 10, "model_kwargs": {}})
    every = 4 if lab.config.quick else 20
    runs = _paper_runs(lab, defaults, every)
    rows = [{"run": label, "final val acc": r.final.get("val_acc", 0.0),
             "median drift": _drift(r)} for label, r in runs.items()]
    return ExperimentResult(
        "distributions", "How the input of a sigmoid moves during training",
        "Internal covariate shift: without BN the distribution of each layer's input keeps "
        "changing while the earlier layers learn; BN holds its mean and spread fixed.",
        rows, _figures(runs, "validation"),
        [f"'median drift' is how far the median input of layer {LAYER} moved between the "
         "first and the last recorded step."])


@experiment("paper-mnist", "the BN paper's Figure 1 on full MNIST: batch 60, 50,000 steps "
                           "(--quick: 3,000), test accuracy and a sigmoid's input",
            dataset="mnist")
def paper_mnist(lab: Lab) -> ExperimentResult:
    base = dict(PAPER, steps=50_000, epochs=0, eval_every=1000)
    defaults = defaults_for(lab, base, quick={"steps": 3000, "eval_every": 250,
                                              "model_kwargs": {}})
    every = 250 if defaults["steps"] >= 10_000 else 50
    runs = _paper_runs(lab, defaults, every)
    checkpoints = [s for s in (1000, 5000, 10_000, 50_000) if s <= defaults["steps"]]
    rows = []
    for label, r in runs.items():
        at = {h["step"]: h["val_acc"] for h in r.history}
        rows.append({"run": label, **{f"acc @ {s // 1000}k": at.get(s) for s in checkpoints},
                     "final test acc": r.final.get("val_acc", 0.0)})
    return ExperimentResult(
        "paper-mnist", "The BN paper's MNIST experiment",
        "Ioffe & Szegedy (2015), Figure 1: with BN the network trains faster and reaches "
        "higher test accuracy, and the input distribution of its sigmoids is stable.",
        rows, _figures(runs, "test"))
