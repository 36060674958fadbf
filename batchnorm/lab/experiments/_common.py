"""What the experiments share: the registry, default sizes, curve figures, table rows.

Texts come from the catalogs (:mod:`batchnorm.lab.i18n`), never from string
literals here: ``lab.t(key)`` for what is only shown (titles, captions, axes,
legends, notes), ``lab.term(key)`` for run ids and the summary's keys and text
values, which stay English (see :mod:`batchnorm.lab.runner`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..i18n import translator
from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ..train import RunResult

__all__ = ["CNN", "QUICK", "REGISTRY", "Experiment", "curve_figure", "defaults_for",
           "diverged", "experiment", "result", "run_row", "target_accuracy", "train_val_series",
           "with_and_without_bn"]


@dataclass(frozen=True)
class Experiment:
    """A registered experiment; its one-line description is the catalog's ``<name>.description``."""

    name: str
    fn: Callable[[Lab], ExperimentResult]
    dataset: str = "mnist5k"

    @property
    def description(self) -> str:
        """The description in English."""
        return self.describe("en")

    def describe(self, lang: str) -> str:
        return translator(lang)(f"{self.name}.description")


REGISTRY: dict[str, Experiment] = {}


def experiment(name: str, dataset: str = "mnist5k"):
    """Register ``fn(lab) -> ExperimentResult`` as ``batchnorm lab <name>``."""

    def register(fn):
        REGISTRY[name] = Experiment(name, fn, dataset)
        return fn
    return register


def result(lab: Lab, name: str, summary: list[dict], figures: list[Figure],
           notes: list[str] | None = None) -> ExperimentResult:
    """An :class:`ExperimentResult` titled from the catalog (``<name>.title``, ``.claim``)."""
    return ExperimentResult(name, lab.t(f"{name}.title"), lab.t(f"{name}.claim"), summary,
                            figures, notes or [], lang=lab.config.lang)


def with_and_without_bn(lab: Lab) -> tuple[tuple[str, str], ...]:
    """``((run id, norm), ...)`` for the two runs most experiments compare."""
    return (lab.term("label.bn"), "batch"), (lab.term("label.no_bn"), "none")


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


def train_val_series(lab: Lab, runs: dict[str, RunResult], train_key: str,
                     val_key: str) -> list[Series]:
    """Per run, the training curve (dashed) and the validation curve (solid), one color."""
    series = []
    for label, r in runs.items():
        steps = [h["step"] for h in r.history]
        shown = lab.show(label)
        series.append(Series(lab.t("series.train", label=shown), steps,
                             [h[train_key] for h in r.history], dashed=True, group=label))
        series.append(Series(lab.t("series.validation", label=shown), steps,
                             [h[val_key] for h in r.history], group=label))
    return series


def curve_figure(lab: Lab, runs: dict[str, RunResult], caption: str,
                 name: str = "curves") -> Figure:
    """Loss (training dashed, validation solid) and validation accuracy of ``runs``."""
    t = lab.t
    loss = train_val_series(lab, runs, "train_loss", "val_loss")
    acc = [Series(lab.show(label), [h["step"] for h in r.history],
                  [h["val_acc"] for h in r.history], group=label) for label, r in runs.items()]
    return Figure(name, t("curves.title"), caption, [
        Panel(t("panel.loss"), t("axis.step"), t("axis.loss"), loss, logy=True),
        Panel(t("panel.val_accuracy"), t("axis.step"), t("axis.accuracy"), acc)])


def diverged(lab: Lab, r: RunResult) -> str:
    return lab.term("value.yes" if r.diverged else "value.no")


def run_row(lab: Lab, label: str, r: RunResult, target: float) -> dict:
    best = max((h["val_acc"] for h in r.history), default=0.0)
    col = lab.term
    return {
        col("col.run"): label,
        col("col.final_val_acc"): r.final.get("val_acc", 0.0),
        col("col.best_val_acc"): best,
        col("col.steps_to", target=target): r.steps_to(target),
        col("col.final_train_loss"): r.history[-1]["train_loss"] if r.history else None,
        col("col.train_seconds"): r.history[-1]["seconds"] if r.history else None,
        col("col.diverged"): diverged(lab, r),
    }


