"""Training dynamics: speed, placement, batch size, learning rate, initialization."""

from __future__ import annotations

from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ._common import (
    CNN,
    curve_figure,
    defaults_for,
    diverged,
    experiment,
    result,
    run_row,
    target_accuracy,
    with_and_without_bn,
)


@experiment("compare")
def compare(lab: Lab) -> ExperimentResult:
    t = lab.t
    defaults = defaults_for(lab, CNN)
    target = target_accuracy(lab, 0.95)
    variants = with_and_without_bn(lab)
    runs = {label: lab.run(label, lab.train_config(defaults, norm=norm))
            for label, norm in variants}
    rows = [run_row(lab, label, r, target) for label, r in runs.items()]
    (bn_label, _), (plain_label, _) = variants
    bn, plain = runs[bn_label].steps_to(target), runs[plain_label].steps_to(target)
    if bn is not None and plain is not None:
        note = t("compare.note_both", target=target, bn=bn, plain=plain, ratio=plain / bn)
    elif bn is not None:
        note = t("compare.note_bn_only", target=target, bn=bn)
    else:
        note = t("compare.note_none", target=target)
    return result(lab, "compare", rows, [curve_figure(lab, runs, t("compare.caption"))], [note])


@experiment("placement")
def placement(lab: Lab) -> ExperimentResult:
    defaults = defaults_for(lab, CNN)
    target = target_accuracy(lab, 0.95)
    variants = ((lab.term("label.bn_after_relu"), "batch", "after"),
                (lab.term("label.bn_before_relu"), "batch", "before"),
                (lab.term("label.no_bn"), "none", "after"))
    runs = {label: lab.run(label, lab.train_config(defaults, norm=n, placement=p))
            for label, n, p in variants}
    return result(lab, "placement", [run_row(lab, label, r, target) for label, r in runs.items()],
                  [curve_figure(lab, runs, lab.t("placement.caption"))])


@experiment("batch-size")
def batch_size(lab: Lab) -> ExperimentResult:
    t, col = lab.t, lab.term
    sizes = [4, 32] if lab.config.quick else [2, 4, 8, 16, 32, 64, 128, 256]
    base = dict(CNN, epochs=2, model_kwargs={"conv_filters": 16, "dense_units": 64})
    defaults = defaults_for(lab, base)
    # Ghost batches of 8 only differ from BN in batches of more than 8.
    norms = ((lab.term("label.bn"), "batch", sizes),
             (lab.term("label.groupnorm"), "group", sizes),
             (lab.term("label.layernorm"), "layer", sizes),
             (lab.term("label.renorm"), "renorm", sizes),
             (lab.term("label.ghost"), "ghost", [bs for bs in sizes if bs > 8]))
    rows, series = [], []
    for label, norm, norm_sizes in norms:
        accs = []
        for bs in norm_sizes:
            # Same epochs for every size, learning rate scaled with the batch
            # (the linear scaling rule), as in the GroupNorm paper's sweep.
            lr = defaults["lr"] * bs / 64
            cfg = lab.train_config(defaults, norm=norm, batch_size=bs, lr=lr,
                                   eval_every=10**9)
            r = lab.run(lab.term("run.batch_size", label=label, batch_size=bs), cfg)
            accs.append(r.final.get("val_acc", 0.0))
            rows.append({col("col.norm"): label, col("col.batch_size"): bs,
                         col("col.lr"): round(lr, 5), col("col.steps"): r.final.get("step"),
                         col("col.final_val_acc"): accs[-1],
                         col("col.diverged"): diverged(lab, r)})
        series.append(Series(lab.show(label), norm_sizes, accs))
    fig = Figure("batch_size", t("batch-size.figure"), t("batch-size.caption"),
                 [Panel(t("batch-size.panel"), t("axis.batch_size"), t("axis.val_accuracy"),
                        series, logx=True)])
    return result(lab, "batch-size", rows, [fig])


@experiment("lr")
def learning_rate(lab: Lab) -> ExperimentResult:
    t, col = lab.t, lab.term
    lrs = [0.01, 0.3] if lab.config.quick else [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    defaults = defaults_for(lab, dict(CNN, epochs=2))
    rows, series = [], []
    for label, norm in with_and_without_bn(lab):
        accs = []
        for lr in lrs:
            r = lab.run(lab.term("run.lr", label=label, lr=lr),
                        lab.train_config(defaults, norm=norm, lr=lr))
            accs.append(r.final.get("val_acc", 0.0) if not r.diverged else 0.0)
            rows.append({col("col.run"): label, col("col.lr"): lr,
                         col("col.final_val_acc"): accs[-1],
                         col("col.best_val_acc"): max((h["val_acc"] for h in r.history),
                                                      default=0.0),
                         col("col.diverged"): diverged(lab, r)})
        series.append(Series(lab.show(label), lrs, accs))
    fig = Figure("lr_sweep", t("lr.figure"), t("lr.caption"),
                 [Panel(t("lr.panel"), t("axis.lr"), t("axis.val_accuracy"), series, logx=True,
                        ylim=(0, 1))])
    return result(lab, "lr", rows, [fig])


@experiment("init")
def init(lab: Lab) -> ExperimentResult:
    t, col = lab.t, lab.term
    scales = [0.1, 1.0] if lab.config.quick else [0.1, 0.3, 1.0, 3.0, 10.0]
    defaults = defaults_for(lab, dict(CNN, epochs=2))
    target = target_accuracy(lab, 0.9)
    rows, series = [], []
    for label, norm in with_and_without_bn(lab):
        accs = []
        for scale in scales:
            r = lab.run(lab.term("run.init", label=label, scale=scale),
                        lab.train_config(defaults, norm=norm, init_scale=scale))
            accs.append(r.final.get("val_acc", 0.0) if not r.diverged else 0.0)
            rows.append({col("col.run"): label, col("col.weight_scale"): scale,
                         col("col.final_val_acc"): accs[-1],
                         col("col.steps_to", target=target): r.steps_to(target),
                         col("col.diverged"): diverged(lab, r)})
        series.append(Series(lab.show(label), scales, accs))
    fig = Figure("init", t("init.figure"), t("init.caption"),
                 [Panel(t("init.panel"), t("axis.weight_scale"), t("axis.val_accuracy"), series,
                        logx=True, ylim=(0, 1))])
    return result(lab, "init", rows, [fig])
