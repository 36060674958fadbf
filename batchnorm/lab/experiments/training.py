"""Training dynamics: speed, placement, batch size, learning rate, initialization."""

from __future__ import annotations

from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ._common import CNN, curve_figure, defaults_for, experiment, run_row, target_accuracy


@experiment("compare", "with vs without BN, same seed and initial weights: curves, "
                        "steps to a target accuracy, wall time (the demo)")
def compare(lab: Lab) -> ExperimentResult:
    defaults = defaults_for(lab, CNN)
    target = target_accuracy(lab, 0.95)
    runs = {label: lab.run(label, lab.train_config(defaults, norm=norm))
            for label, norm in (("BN", "batch"), ("no BN", "none"))}
    rows = [run_row(label, r, target) for label, r in runs.items()]
    bn, plain = runs["BN"].steps_to(target), runs["no BN"].steps_to(target)
    notes = []
    if bn is not None and plain is not None:
        notes.append(f"BN reached {target:.0%} validation accuracy in {bn} steps, "
                     f"without BN it took {plain} steps ({plain / bn:.1f}x).")
    elif bn is not None:
        notes.append(f"BN reached {target:.0%} validation accuracy in {bn} steps; "
                     "without BN the run never did.")
    else:
        notes.append(f"No run reached {target:.0%} validation accuracy in this budget.")
    return ExperimentResult(
        "compare", "Training with and without Batch Normalization",
        "BN speeds up training: with the same initial weights, data order and learning "
        "rate, the network with BN reaches a given accuracy in fewer steps.",
        rows, [curve_figure(runs, caption=(
            "Loss (dashed: training, averaged since the previous point; solid: validation) "
            "and validation accuracy against training steps, with and without BN."))],
        notes)


@experiment("placement", "BN after the ReLU (the course's code) vs before it (fused "
                          "activation) vs no BN")
def placement(lab: Lab) -> ExperimentResult:
    defaults = defaults_for(lab, CNN)
    target = target_accuracy(lab, 0.95)
    variants = (("BN after ReLU", "batch", "after"), ("BN before ReLU", "batch", "before"),
                ("no BN", "none", "after"))
    runs = {label: lab.run(label, lab.train_config(defaults, norm=n, placement=p))
            for label, n, p in variants}
    return ExperimentResult(
        "placement", "Where to put BN: before or after the activation",
        "The BN paper normalizes the input of the nonlinearity (BN before the ReLU); the "
        "course's Keras code puts it after. Both train; which is better depends on the model.",
        [run_row(label, r, target) for label, r in runs.items()],
        [curve_figure(runs, caption=(
            "BN placed after the ReLU, before it (our BatchNorm2d(..., activation='relu')), "
            "and no BN, from the same initial weights."))])


@experiment("batch-size", "BN vs GroupNorm vs LayerNorm for batch sizes from 2 to 256")
def batch_size(lab: Lab) -> ExperimentResult:
    sizes = [4, 32] if lab.config.quick else [2, 4, 8, 16, 32, 64, 128, 256]
    base = dict(CNN, epochs=2, model_kwargs={"conv_filters": 16, "dense_units": 64})
    defaults = defaults_for(lab, base)
    norms = (("BN", "batch"), ("GroupNorm", "group"), ("LayerNorm", "layer"))
    rows, series = [], []
    for label, norm in norms:
        accs = []
        for bs in sizes:
            # Same epochs for every size, learning rate scaled with the batch
            # (the linear scaling rule), as in the GroupNorm paper's sweep.
            lr = defaults["lr"] * bs / 64
            cfg = lab.train_config(defaults, norm=norm, batch_size=bs, lr=lr,
                                   eval_every=10**9)
            r = lab.run(f"{label} bs={bs}", cfg)
            accs.append(r.final.get("val_acc", 0.0))
            rows.append({"norm": label, "batch size": bs, "lr": round(lr, 5),
                         "steps": r.final.get("step"), "final val acc": accs[-1],
                         "diverged": "yes" if r.diverged else "no"})
        series.append(Series(label, sizes, accs))
    fig = Figure("batch_size", "Validation accuracy against batch size",
                 "Final validation accuracy (eval mode) after the same number of epochs, "
                 "learning rate proportional to the batch size. BN's statistics come from "
                 "the mini-batch, so small batches hurt it; GroupNorm and LayerNorm do not "
                 "depend on the batch.",
                 [Panel("Accuracy vs batch size", "batch size", "validation accuracy", series,
                        logx=True)])
    return ExperimentResult(
        "batch-size", "Batch size: where BN's statistics get noisy",
        "BN estimates the mean and variance from the mini-batch: with very small batches the "
        "estimates are noisy and training and inference statistics disagree.",
        rows, [fig])


@experiment("lr", "a learning-rate sweep with and without BN")
def learning_rate(lab: Lab) -> ExperimentResult:
    lrs = [0.01, 0.3] if lab.config.quick else [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    defaults = defaults_for(lab, dict(CNN, epochs=2))
    rows, series = [], []
    for label, norm in (("BN", "batch"), ("no BN", "none")):
        accs = []
        for lr in lrs:
            r = lab.run(f"{label} lr={lr}", lab.train_config(defaults, norm=norm, lr=lr))
            accs.append(r.final.get("val_acc", 0.0) if not r.diverged else 0.0)
            rows.append({"run": label, "lr": lr, "final val acc": accs[-1],
                         "best val acc": max((h["val_acc"] for h in r.history), default=0.0),
                         "diverged": "yes" if r.diverged else "no"})
        series.append(Series(label, lrs, accs))
    fig = Figure("lr_sweep", "Validation accuracy against learning rate",
                 "Final validation accuracy after the same number of steps for each learning "
                 "rate (0 where the loss diverged). BN keeps the scale of each layer's input "
                 "fixed, so it tolerates larger learning rates.",
                 [Panel("Accuracy vs learning rate", "learning rate (SGD, momentum 0.9)",
                        "validation accuracy", series, logx=True, ylim=(0, 1))])
    return ExperimentResult(
        "lr", "Learning rate: how much BN widens the usable range",
        "BN allows higher learning rates: without it, large rates diverge or stall.",
        rows, [fig])


@experiment("init", "a badly scaled initialization with and without BN")
def init(lab: Lab) -> ExperimentResult:
    scales = [0.1, 1.0] if lab.config.quick else [0.1, 0.3, 1.0, 3.0, 10.0]
    defaults = defaults_for(lab, dict(CNN, epochs=2))
    target = target_accuracy(lab, 0.9)
    rows, series, runs = [], [], {}
    for label, norm in (("BN", "batch"), ("no BN", "none")):
        accs = []
        for scale in scales:
            name = f"{label} x{scale:g}"
            r = lab.run(name, lab.train_config(defaults, norm=norm, init_scale=scale))
            runs[name] = r
            accs.append(r.final.get("val_acc", 0.0) if not r.diverged else 0.0)
            rows.append({"run": label, "weight scale": scale, "final val acc": accs[-1],
                         f"steps to {target:.0%}": r.steps_to(target),
                         "diverged": "yes" if r.diverged else "no"})
        series.append(Series(label, scales, accs))
    fig = Figure("init", "Validation accuracy against the scale of the initial weights",
                 "Every conv and linear weight multiplied by a factor after the default "
                 "initialization. BN renormalizes each layer's output, so the scale of the "
                 "weights before it hardly matters.",
                 [Panel("Accuracy vs initial weight scale", "weight scale factor",
                        "validation accuracy", series, logx=True, ylim=(0, 1))])
    return ExperimentResult(
        "init", "Initialization: BN makes training robust to the weights' scale",
        "Without BN, weights initialized too small or too large make signals vanish or "
        "explode; with BN each layer's input is renormalized.",
        rows, [fig])
