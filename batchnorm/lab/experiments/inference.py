"""Training vs inference: the pitfalls of BN's two modes, and its regularizing effect."""

from __future__ import annotations

import copy

import torch

from ...tools import recalibrate_batchnorm
from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ..train import evaluate
from ._common import (
    CNN,
    curve_figure,
    defaults_for,
    experiment,
    result,
    train_val_series,
    with_and_without_bn,
)


def shift_images(x: torch.Tensor) -> torch.Tensor:
    """The "new camera" shift: half the contrast, brighter (values stay in [0, 1])."""
    return x * 0.5 + 0.25


@experiment("modes")
def modes(lab: Lab) -> ExperimentResult:
    t, term = lab.t, lab.term
    defaults = defaults_for(lab, CNN)
    _, model = lab.run(term("label.bn"), lab.train_config(defaults, norm="batch"),
                       keep_model=True)
    data = lab.data
    x_val, y_val = data.x_val, data.y_val

    def acc(net, x=x_val, y=y_val, **kw):
        return evaluate(net, x, y, **kw)[1]

    batched = acc(model)
    single = acc(model, batch_size=1)
    recalibrated_model = copy.deepcopy(model)
    # Precise BN on the shifted training images: the exact statistics of the new data.
    recalibrate_batchnorm(recalibrated_model, shift_images(data.x_train).split(250))
    measured = [
        (term("modes.eval"), batched),
        (term("modes.train_500"), acc(model, train_mode=True, batch_size=500)),
        (term("modes.train_8"), acc(model, train_mode=True, batch_size=8)),
        (term("modes.single"), single),
        (term("modes.stale"), acc(model, shift_images(x_val))),
        (term("modes.recomputed"), acc(recalibrated_model, shift_images(x_val))),
    ]
    notes = [t("modes.note_eval", single=single, batched=batched)]
    model.train()
    try:
        with torch.no_grad():
            model(x_val[:1].to(lab.config.device))
        notes.append(t("modes.note_single_ran"))
    except ValueError as err:
        notes.append(t("modes.note_single_fails", error=err))
    model.eval()
    gain = measured[-1][1] - measured[-2][1]
    notes.append(t("modes.note_shift", gain=gain))
    rows = [{term("col.condition"): name, term("col.val_acc"): value}
            for name, value in measured]
    fig = Figure("modes", t("modes.figure"), t("modes.caption"),
                 [Panel(t("modes.panel"), "", t("axis.accuracy"),
                        [Series(t("label.bn_network"), [lab.show(m[0]) for m in measured],
                                [m[1] for m in measured])], kind="bars", ylim=(0, 1))])
    return result(lab, "modes", rows, [fig], notes)


@experiment("regularization")
def regularization(lab: Lab) -> ExperimentResult:
    t, col = lab.t, lab.term
    base = dict(CNN, epochs=20, train_size=1000, eval_every=16)
    defaults = defaults_for(lab, base, quick={"train_size": 200})
    runs = {label: lab.run(label, lab.train_config(defaults, norm=norm))
            for label, norm in with_and_without_bn(lab)}
    rows = []
    for label, r in runs.items():
        train_acc = r.final.get("train_eval_acc", 0.0)
        val_acc = r.final.get("val_acc", 0.0)
        rows.append({col("col.run"): label, col("col.train_acc"): train_acc,
                     col("col.val_acc"): val_acc, col("col.acc_gap"): train_acc - val_acc,
                     col("col.final_val_loss"): r.final.get("val_loss")})
    acc_series = train_val_series(lab, runs, "train_acc", "val_acc")
    figs = [Figure("gap", t("regularization.figure"),
                   t("regularization.caption", size=defaults["train_size"]),
                   [Panel(t("panel.accuracy"), t("axis.step"), t("axis.accuracy"),
                          acc_series)]),
            curve_figure(lab, runs, t("regularization.curves_caption"))]
    return result(lab, "regularization", rows, figs)
