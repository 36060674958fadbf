"""One training run: a frozen config in, a history of metrics out.

Deterministic for a given config on a given machine: the seed fixes the
initial weights and the order of the mini-batches (a private generator, so
nothing else that draws random numbers changes it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from .data import Dataset
from .models import ARCHS, NORMS, PLACEMENTS, build_model

__all__ = ["RunResult", "TrainConfig", "evaluate", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one run (its hash names the run on disk).

    Attributes:
        arch: ``"cnn"``, ``"mlp"`` or ``"resnet"``.
        norm: ``"batch"``, ``"none"``, ``"group"``, ``"layer"``, ``"instance"``.
        placement: BN ``"after"`` or ``"before"`` the ReLU (``cnn`` only).
        batch_size: mini-batch size.
        lr: learning rate of SGD.
        momentum: SGD momentum (not BN's).
        steps: optimizer steps; ``0`` means ``epochs`` full passes.
        epochs: passes over the training set when ``steps`` is 0.
        eval_every: steps between validation passes.
        seed: initial weights and batch order.
        init_scale: multiplies every conv/linear weight after initialization
            (the ``init`` experiment's badly scaled start).
        bn_momentum: BN's running-statistics momentum (PyTorch's convention).
        model_kwargs: extra ``build_model`` arguments, as sorted pairs.
        train_size: train on a seeded random subset of this many images
            (``0``: all of them).
        dataset: the data set's name (recorded, and part of the run's identity).
    """

    arch: str = "cnn"
    norm: str = "batch"
    placement: str = "after"
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    steps: int = 0
    epochs: int = 3
    eval_every: int = 25
    seed: int = 0
    init_scale: float = 1.0
    bn_momentum: float = 0.1
    model_kwargs: tuple = ()
    train_size: int = 0
    dataset: str = "mnist5k"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {', '.join(NORMS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; expected one of "
                             f"{', '.join(PLACEMENTS)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            raise ValueError("give a positive number of steps or epochs")
        if self.train_size < 0:
            raise ValueError(f"train_size must be non-negative, got {self.train_size}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_kwargs"] = dict(self.model_kwargs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["model_kwargs"] = tuple(sorted(dict(d.get("model_kwargs", {})).items()))
        return cls(**d)


@dataclass
class RunResult:
    """The outcome of one run.

    Attributes:
        config: the run's config.
        history: one row per validation pass: ``step``, ``epoch``,
            ``train_loss`` and ``train_acc`` (averaged since the previous
            row), ``val_loss``, ``val_acc``, ``seconds`` (training time so far).
        final: the last row plus ``train_eval_acc`` (training set, eval mode).
        diverged: the loss became NaN or Inf and the run stopped.
        extra: what else the experiment recorded (e.g. activation percentiles).
    """

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    diverged: bool = False
    extra: dict = field(default_factory=dict)

    def steps_to(self, val_acc: float) -> int | None:
        """First step whose validation accuracy reached ``val_acc``, or ``None``."""
        for row in self.history:
            if row["val_acc"] >= val_acc:
                return row["step"]
        return None

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "history": self.history, "final": self.final,
                "diverged": self.diverged, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        return cls(TrainConfig.from_dict(d["config"]), d["history"], d["final"], d["diverged"],
                   d.get("extra", {}))


def make_model(config: TrainConfig, data: Dataset) -> torch.nn.Module:
    """The run's model with its seeded (and possibly rescaled) initial weights."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, data.image_shape, data.num_classes, norm=config.norm,
                        placement=config.placement, momentum=config.bn_momentum,
                        **dict(config.model_kwargs))
    if config.init_scale != 1.0:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    m.weight.mul_(config.init_scale)
    return model


@torch.no_grad()
def evaluate(model, x, y, batch_size=500, *, train_mode=False) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` (eval mode unless ``train_mode``).

    ``train_mode=True`` evaluates with batch statistics, the classic mistake
    of forgetting ``model.eval()``; the running statistics are restored after.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items()} if train_mode else None
    was_training = model.training
    model.train(train_mode)
    total_loss, correct = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb)
        total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    if saved is not None:
        model.load_state_dict(saved)
    return total_loss / len(x), correct / len(x)


def train(config: TrainConfig, data: Dataset, *, device: str = "cpu",
          on_step: Callable[[int, int], None] | None = None,
          model: torch.nn.Module | None = None) -> tuple[RunResult, torch.nn.Module]:
    """Train one model with SGD and cross-entropy, validating every ``eval_every`` steps.

    Args:
        config: the run.
        data: train and validation tensors.
        device: ``"cpu"`` or ``"cuda"``.
        on_step: called as ``on_step(step, total_steps)`` after each step
            (progress bars).
        model: train this model instead of building one from ``config``.

    Returns:
        ``(result, model)``.
    """
    model = (model if model is not None else make_model(config, data)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    gen = torch.Generator().manual_seed(config.seed + 1)
    x_train, y_train = data.x_train, data.y_train
    if 0 < config.train_size < len(x_train):
        keep = torch.randperm(len(x_train), generator=gen)[:config.train_size]
        x_train, y_train = x_train[keep], y_train[keep]
    n = len(x_train)
    per_epoch = max(1, n // config.batch_size)  # drop the ragged last batch
    total = config.steps or config.epochs * per_epoch
    x_val, y_val = data.x_val, data.y_val
    result = RunResult(config)
    step, seconds, loss_sum, correct, seen = 0, 0.0, 0.0, 0, 0
    model.train()
    while step < total:
        order = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            if step >= total:
                break
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            start = time.perf_counter()
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seconds += time.perf_counter() - start
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                result.diverged = True
                break
            loss_sum += value * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            if on_step is not None:
                on_step(step, total)
            if step % config.eval_every == 0 or step == total:
                val_loss, val_acc = evaluate(model, x_val, y_val)
                result.history.append(dict(
                    step=step, epoch=round(step / per_epoch, 4), train_loss=loss_sum / seen,
                    train_acc=correct / seen, val_loss=val_loss, val_acc=val_acc,
                    seconds=round(seconds, 4)))
                loss_sum, correct, seen = 0.0, 0, 0
                model.train()
        if result.diverged:
            break
    last = result.history[-1] if result.history else dict(step=step, val_acc=0.0, val_loss=math.inf)
    result.final = dict(last)
    if not result.diverged:
        result.final["train_eval_acc"] = evaluate(model, x_train, y_train)[1]
    return result, model
