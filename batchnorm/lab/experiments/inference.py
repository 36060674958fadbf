"""Training vs inference: the pitfalls of BN's two modes, and its regularizing effect."""

from __future__ import annotations

import copy

import torch

from ..results import ExperimentResult, Figure, Panel, Series
from ..runner import Lab
from ..train import evaluate
from ._common import CNN, curve_figure, defaults_for, experiment


def shift_images(x: torch.Tensor) -> torch.Tensor:
    """The "new camera" shift: half the contrast, brighter (values stay in [0, 1])."""
    return x * 0.5 + 0.25


@torch.no_grad()
def recompute_running_stats(model: torch.nn.Module, x: torch.Tensor, batch_size=250) -> None:
    """Re-estimate every BN layer's running statistics on ``x`` (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # equal weight for every batch
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device))
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    model.train(was_training)


@experiment("modes", "the inference pitfalls measured: evaluating in train mode, a batch of "
                     "one, statistics left stale after the data shift")
def modes(lab: Lab) -> ExperimentResult:
    defaults = defaults_for(lab, CNN)
    _, model = lab.run("BN", lab.train_config(defaults, norm="batch"), keep_model=True)
    data = lab.data
    x_val, y_val = data.x_val, data.y_val

    def acc(net, x=x_val, y=y_val, **kw):
        return evaluate(net, x, y, **kw)[1]

    batched = acc(model)
    single = acc(model, batch_size=1)
    recalibrated_model = copy.deepcopy(model)
    recompute_running_stats(recalibrated_model, shift_images(data.x_train))
    measured = [
        ("eval mode (correct)", batched),
        ("train mode, batches of 500", acc(model, train_mode=True, batch_size=500)),
        ("train mode, batches of 8", acc(model, train_mode=True, batch_size=8)),
        ("eval mode, one image at a time", single),
        ("shifted data, stale statistics", acc(model, shift_images(x_val))),
        ("shifted data, recomputed statistics", acc(recalibrated_model, shift_images(x_val))),
    ]
    notes = [f"In eval mode a prediction does not depend on the rest of the batch: one image "
             f"at a time gives {single:.1%}, batches of 500 give {batched:.1%}."]
    model.train()
    try:
        with torch.no_grad():
            model(x_val[:1].to(lab.config.device))
        notes.append("A batch of one in train mode ran (spatial positions gave the statistics).")
    except ValueError as err:
        notes.append(f"A batch of one in train mode fails: the dense BN layer raises "
                     f"\"{err}\". Even where it runs, a single image's statistics would "
                     "normalize away the very features that identify it.")
    model.eval()
    gain = measured[-1][1] - measured[-2][1]
    notes.append("The shift halves the contrast and brightens the images, as a new camera "
                 "might. Recomputing the running statistics on shifted training images, with "
                 f"no weight changed, changes accuracy by {gain:+.1%}.")
    rows = [{"condition": name, "val acc": value} for name, value in measured]
    fig = Figure("modes", "One trained network, evaluated several ways",
                 "Validation accuracy of the same trained BN network: in eval mode (running "
                 "statistics), in train mode by mistake (batch statistics of 500 or 8 images), "
                 "one image at a time, and on shifted data before and after recomputing the "
                 "running statistics.",
                 [Panel("Validation accuracy of the BN network", "", "accuracy",
                        [Series("BN network", [m[0] for m in measured],
                                [m[1] for m in measured])], kind="bars", ylim=(0, 1))])
    return ExperimentResult(
        "modes", "Training mode vs inference mode",
        "BN behaves differently in training (batch statistics, running statistics updated) "
        "and inference (running statistics, fixed): forgetting model.eval(), tiny batches and "
        "stale statistics after a data shift all cost accuracy.",
        rows, [fig], notes)


@experiment("regularization", "the train vs validation gap with and without BN")
def regularization(lab: Lab) -> ExperimentResult:
    base = dict(CNN, epochs=20, train_size=1000, eval_every=16)
    defaults = defaults_for(lab, base, quick={"train_size": 200})
    runs = {label: lab.run(label, lab.train_config(defaults, norm=norm))
            for label, norm in (("BN", "batch"), ("no BN", "none"))}
    rows = []
    for label, r in runs.items():
        train_acc = r.final.get("train_eval_acc", 0.0)
        val_acc = r.final.get("val_acc", 0.0)
        rows.append({"run": label, "train acc": train_acc, "val acc": val_acc,
                     "acc gap (train - val)": train_acc - val_acc,
                     "final val loss": r.final.get("val_loss")})
    acc_series = []
    for label, r in runs.items():
        steps = [h["step"] for h in r.history]
        acc_series.append(Series(f"{label} (train)", steps, [h["train_acc"] for h in r.history],
                                 dashed=True, group=label))
        acc_series.append(Series(f"{label} (validation)", steps,
                                 [h["val_acc"] for h in r.history], group=label))
    size = defaults["train_size"]
    figs = [Figure("gap", "Training vs validation accuracy",
                   f"Training on {size} images for many epochs: dashed lines are the training "
                   "accuracy (in train mode, averaged since the previous point), solid lines "
                   "the validation accuracy. The space between them is the generalization gap.",
                   [Panel("Accuracy", "training step", "accuracy", acc_series)]),
            curve_figure(runs, caption="Loss and validation accuracy of the same runs.")]
    return ExperimentResult(
        "regularization", "Does BN regularize?",
        "BN adds noise (each sample is normalized with its batch's statistics), which acts "
        "as a mild regularizer: the gap between training and validation accuracy can shrink.",
        rows, figs)
