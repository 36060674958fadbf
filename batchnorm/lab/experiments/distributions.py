"""Inside the network: how the input of a sigmoid moves during training (the BN paper's Fig. 1)."""

from __future__ import annotations

from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ..train import RunResult
from ._common import defaults_for, experiment, result, with_and_without_bn

# The paper's MNIST network: 3 sigmoid layers of 100 units, mini-batches of 60.
PAPER = dict(arch="mlp", batch_size=60, lr=0.1, momentum=0.9)
LAYER = "sigmoid2"  # the last hidden layer's nonlinearity


def _percentile_series(lab: Lab, label: str, r: RunResult) -> Series:
    rows = [row for row in r.extra.get("monitor", []) if row["layer"] == LAYER]
    return Series(lab.show(label), [row["step"] for row in rows], [row["p50"] for row in rows],
                  lo=[row["p15"] for row in rows], hi=[row["p85"] for row in rows], group=label)


def _figures(lab: Lab, runs: dict[str, RunResult], evaluated_on: str) -> list[Figure]:
    """The paper's Figure 1: accuracy (``evaluated_on``: validation or test), sigmoid inputs."""
    t = lab.t
    # A run keeps its color in every panel: series are grouped by run id, not by shown label.
    acc = [Series(lab.show(label), [h["step"] for h in r.history],
                  [h["val_acc"] for h in r.history], group=label) for label, r in runs.items()]
    bands = [Panel(t("paper.sigmoid_panel", label=lab.show(label)), t("axis.step"),
                   t("axis.preactivation"), [_percentile_series(lab, label, r)])
             for label, r in runs.items()]
    panel = "panel.val_accuracy" if evaluated_on == "validation" else "panel.test_accuracy"
    return [
        Figure("accuracy", t(f"paper.accuracy_figure.{evaluated_on}"),
               t(f"paper.accuracy_caption.{evaluated_on}"),
               [Panel(t(panel), t("axis.step"), t("axis.accuracy"), acc)]),
        Figure("sigmoid_input", t("paper.sigmoid_figure"), t("paper.sigmoid_caption"), bands),
    ]


def _paper_runs(lab: Lab, defaults: dict, every: int) -> dict[str, RunResult]:
    monitor = dict(layers=[LAYER], what="input", every=every)
    return {label: lab.run(label, lab.train_config(defaults, norm=norm), monitor=monitor)
            for label, norm in with_and_without_bn(lab)}


def _drift(r: RunResult) -> float | None:
    rows = [row for row in r.extra.get("monitor", []) if row["layer"] == LAYER]
    if len(rows) < 2:
        return None
    return abs(rows[-1]["p50"] - rows[0]["p50"])


@experiment("distributions")
def distributions(lab: Lab) -> ExperimentResult:
    col = lab.term
    base = dict(PAPER, steps=2000, epochs=0, eval_every=100)
    defaults = defaults_for(lab, base, quick={"steps": 40, "eval_every": 10, "model_kwargs": {}})
    every = 4 if lab.config.quick else 20
    runs = _paper_runs(lab, defaults, every)
    rows = [{col("col.run"): label, col("col.final_val_acc"): r.final.get("val_acc", 0.0),
             col("col.median_drift"): _drift(r)} for label, r in runs.items()]
    return result(lab, "distributions", rows, _figures(lab, runs, "validation"),
                  [lab.t("distributions.note_drift", column=lab.show(col("col.median_drift")),
                         layer=LAYER)])


@experiment("paper-mnist", dataset="mnist")
def paper_mnist(lab: Lab) -> ExperimentResult:
    col = lab.term
    base = dict(PAPER, steps=50_000, epochs=0, eval_every=1000)
    defaults = defaults_for(lab, base, quick={"steps": 3000, "eval_every": 250,
                                              "model_kwargs": {}})
    every = 250 if defaults["steps"] >= 10_000 else 50
    runs = _paper_runs(lab, defaults, every)
    checkpoints = [s for s in (1000, 5000, 10_000, 50_000) if s <= defaults["steps"]]
    rows = []
    for label, r in runs.items():
        at = {h["step"]: h["val_acc"] for h in r.history}
        rows.append({col("col.run"): label,
                     **{col("col.acc_at", thousands=s // 1000): at.get(s) for s in checkpoints},
                     col("col.final_test_acc"): r.final.get("val_acc", 0.0)})
    return result(lab, "paper-mnist", rows, _figures(lab, runs, "test"))
