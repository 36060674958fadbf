"""The doctor's checks: each turns what :func:`batchnorm.tools.doctor` saw into findings.

Three kinds of evidence: the module tree and its state (modes, running
statistics, the optimizer's parameter groups), the data flow
(:mod:`batchnorm.tools._doctor_graph`: what feeds what), and the values seen
while running the example (:class:`LayerCall`, one per BN layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from ..nn.frozen import FrozenBatchNorm
from ..nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from ..nn.sync import SyncBatchNorm
from ._doctor_graph import Graph, Node
from ._doctor_report import CHECKS, Finding

# An input channel is "far from normalized" past these (normalized: mean 0, std 1).
INPUT_MEAN_LIMIT = 3.0
INPUT_STD_RANGE = (0.05, 5.0)
# Running statistics are "stale" when the example batch, normalized with them,
# has a root mean square (over channels and values) outside this range; it is
# about 1 when they fit. Measured in eval mode: the lab's CNN and ResNet trained
# on mnist5k, 0.6-1.6 for validation batches of 1 to 64 samples, 80-120 for
# 0-255 pixels; torchvision's and timm's ResNets, MobileNetV3 and EfficientNet
# with random weights and statistics from three training batches, 0.43-2.6 for
# batches of 4 and 8, 0.24-5.1 for single samples (whose statistics vary more,
# hence the wider range).
STALE_RMS_RANGE = (0.25, 4.0)
STALE_RMS_RANGE_ONE_SAMPLE = (0.1, 10.0)

_OTHER_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, _InstanceNorm)
if hasattr(nn, "RMSNorm"):
    _OTHER_NORMS += (nn.RMSNorm,)
_NORM_FUNCS = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
               "local_response_norm"}
_DROPOUT_FUNCS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                  "feature_alpha_dropout", "feature_dropout"}
_SHAPE_ONLY = (nn.Identity, nn.Flatten, nn.Unflatten)
_SHAPE_FUNCS = {"flatten", "unflatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze",
                "clone", "to", "float", "view_as", "reshape_as"}
_SOFTMAX = (nn.Softmax, nn.LogSoftmax, nn.Softmax2d)
_SOFTMAX_FUNCS = {"softmax", "log_softmax"}
# Elementwise arithmetic on the raw input: the model normalizes it itself.
_ARITH_FUNCS = {"sub", "rsub", "truediv", "div", "mul", "add"}


def is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm)


def is_frozen_bn(m: nn.Module) -> bool:
    """Ours, torchvision's and detectron2's FrozenBatchNorm (plain modules with BN buffers)."""
    return isinstance(m, FrozenBatchNorm) or (
        type(m).__name__.startswith("FrozenBatchNorm") and hasattr(m, "running_var"))


def _is_sync(m: nn.Module) -> bool:
    return isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm))


def _describe(m: nn.Module) -> str:
    return type(m).__name__


@dataclass
class LayerCall:
    """What one BN layer saw on its first call during the run."""

    shape: tuple[int, ...]
    values: int  # per channel
    batch_stats: bool  # normalized with the batch's statistics (as the model was)
    flipped: bool  # run in eval mode by the doctor to avoid the one-value error
    mean: torch.Tensor | None  # (C,) float64 on the CPU
    var: torch.Tensor | None  # (C,) biased


# ------------------------------------------------------------ state, modes ---

def never_updated(m: nn.Module) -> bool:
    if not (is_bn(m) and m.track_running_stats and m.running_mean is not None):
        return False
    tracked = m.num_batches_tracked
    return (tracked is None or int(tracked) == 0) and bool((m.running_mean == 0).all()) \
        and bool((m.running_var == 1).all())


def state_findings(model, bns, intent, explicit) -> list[Finding]:
    found = []
    for path, m in bns:
        bad = []
        for name in ("running_mean", "running_var", "weight", "bias"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                nonfinite = int((~torch.isfinite(t)).sum())
                if nonfinite:
                    bad.append(f"{name} has {nonfinite} non-finite value(s)")
        var = getattr(m, "running_var", None)
        if isinstance(var, torch.Tensor) and bool((var < 0).any()):
            bad.append(f"running_var has {int((var < 0).sum())} negative value(s)")
        if bad:
            found.append(Finding("BN009", "error", path, "; ".join(bad), (path,), "state"))
        if never_updated(m) and (intent == "eval" or not m.training):
            found.append(Finding(
                "BN008", "error", path, "num_batches_tracked is 0 and running_mean / running_var "
                "are still 0 / 1", (path,), "state"))
        if intent == "eval" and is_bn(m) and m.running_mean is None:
            found.append(Finding(
                "BN013", "warning", path, "track_running_stats=False: in eval mode it still "
                "normalizes with the batch's statistics", (path,), "state"))
    training = [p for p, m in bns if is_bn(m) and m.training]
    if intent == "eval" and training:
        dropout = sum(isinstance(m, _DropoutNd) and m.training and m.p > 0
                      for m in model.modules())
        extra = f" (and {dropout} dropout layer(s) still drop units)" if dropout else ""
        if model.training:
            found.append(Finding(
                "BN011", "error", "", f"the model is in training mode (model.training is True): "
                f"{len(training)} BN layer(s) normalize with each batch's statistics and update "
                f"their running statistics{extra}", tuple(training), "mode"))
        else:
            found += [Finding("BN011", "error", p, "this BN layer is in training mode inside a "
                              "model in eval mode", (p,), "mode") for p in training]
    if explicit and intent == "train" and not model.training:
        found.append(Finding("BN012", "warning", "", "the model is in eval mode "
                             "(model.training is False) but mode='train' was given",
                             tuple(p for p, _ in bns), "mode"))
    return found


def weight_decay_findings(model, optimizer) -> list[Finding]:
    owners = {}
    for path, m in model.named_modules():
        if is_bn(m):
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    owners[id(p)] = (path, name)
    found = []
    for i, group in enumerate(optimizer.param_groups):
        decay = group.get("weight_decay", 0) or 0
        if decay <= 0:
            continue
        hit = [owners[id(p)] for p in group["params"] if id(p) in owners and p.requires_grad]
        if hit:
            layers = tuple(dict.fromkeys(path for path, _ in hit))
            found.append(Finding(
                "BN014", "warning", layers[0] if len(layers) == 1 else "",
                f"param group {i} (weight_decay={decay:g}) decays {len(hit)} gamma/beta "
                f"parameter(s) of {len(layers)} BN layer(s)", layers, "optimizer",
                details={"group": i, "weight_decay": decay,
                         "parameters": [f"{p}.{n}" for p, n in hit]}))
    return found


# --------------------------------------------------------------- placement ---

def _shape_only(node: Node, source: Node) -> bool:
    """``node`` only reshapes ``source`` (its data input)."""
    if node.data is not source:
        return False
    if node.kind == "module":
        return isinstance(node.module, _SHAPE_ONLY)
    return node.kind == "function" and node.name in _SHAPE_FUNCS


def _upstream(node: Node) -> tuple[Node | None, bool]:
    """The step whose output reaches ``node``'s data input through shape-only
    steps, and whether every value on that path is used by nothing else."""
    src, exclusive = node.data, True
    while src is not None and src.data is not None and _shape_only(src, src.data):
        exclusive = exclusive and len(src.users) == 1
        src = src.data
    if src is not None:
        exclusive = exclusive and len(src.users) == 1
    return src, exclusive


def _downstream(node: Node) -> list[Node]:
    """The steps that consume ``node``'s output, looking through shape-only steps."""
    found, todo, seen = [], [(node, u) for u in node.users], set()
    while todo:
        source, user = todo.pop(0)
        if id(user) in seen:
            continue
        seen.add(id(user))
        if _shape_only(user, source):
            todo += [(user, u) for u in user.users]
        else:
            found.append(user)
    return found


def _plain_norm(node: Node) -> bool:
    """``node``'s output is a normalization's output and nothing more."""
    if node.kind == "function":
        return node.name in _NORM_FUNCS
    m = node.module
    if node.kind != "module" or m is None:
        return False
    if is_bn(m) or is_frozen_bn(m):
        return getattr(m, "activation", None) is None and next(m.children(), None) is None \
            and len(node.inputs) <= 1
    return isinstance(m, _OTHER_NORMS)


def _dropout_p(node: Node) -> float | None:
    """Dropout probability if ``node`` is a dropout, else ``None``."""
    if node.kind == "module" and isinstance(node.module, _DropoutNd):
        return float(node.module.p)
    if node.kind == "function" and node.name in _DROPOUT_FUNCS:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return float(p) if isinstance(p, (int, float)) else 0.5
    return None


def placement_findings(graph: Graph) -> list[Finding]:
    evidence = graph.source
    confidence = "high" if graph.source == "fx" else "medium"
    found = []

    def add(code, path, message, layers, **details):
        found.append(Finding(code, CHECKS[code].severity, path, message, layers, evidence,
                             confidence, details))

    for node in graph.module_nodes():
        if not is_bn(node.module):
            continue
        bn, bn_type = node.name, _describe(node.module)
        src, exclusive = _upstream(node)
        if src is not None and src.kind == "module":
            m = src.module
            if isinstance(m, (_ConvNd, nn.Linear)) and getattr(m, "bias", None) is not None \
                    and exclusive:
                add("BN001", src.name, f"{_describe(m)} has a bias and feeds {bn} ({bn_type}) "
                    "directly", (src.name, bn), bn=bn)
        if src is not None and _plain_norm(src):
            what = f"{src.name} ({_describe(src.module)})" if src.kind == "module" \
                else f"{src.name}()"
            add("BN002", bn, f"normalizes the output of {what} again", (bn,), source=src.name)
        p = _dropout_p(src) if src is not None else None
        if p is not None and p > 0:
            where = src.name if src.kind == "module" else bn
            add("BN004", where, f"dropout (p={p:g}) feeds {bn} ({bn_type}) directly",
                (where, bn) if where != bn else (bn,), bn=bn, p=p)
        if _plain_norm(node):
            for user in _downstream(node):
                if (user.kind == "module" and isinstance(user.module, _SOFTMAX)) or \
                        (user.kind == "function" and user.name in _SOFTMAX_FUNCS):
                    add("BN003", bn, f"its output goes straight into {user.name}", (bn,))
                elif user.kind == "output" and user.single:
                    add("BN003", bn, "its output is the model's output", (bn,))
    return found


# ------------------------------------------------------------------- input ---

def _input_consumers(name: str, index: int, graph: Graph | None) -> list[Node] | None:
    if graph is None:
        return None
    inputs = graph.input_nodes()
    by_name = {n.name: n for n in inputs}
    node = by_name.get(name) or (inputs[index] if index < len(inputs) else None)
    return None if node is None else node.users


def input_findings(args, kwargs, graph: Graph | None) -> list[Finding]:
    found = []
    single = len(args) + len(kwargs) == 1
    named = [(f"arg{i}", i, "input" if single else f"input {i}", a) for i, a in enumerate(args)]
    named += [(k, len(args) + i, f"input {k!r}", v) for i, (k, v) in enumerate(kwargs.items())]
    for name, index, label, t in named:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        users = _input_consumers(name, index, graph) or []
        if any(_plain_norm(u) or (u.kind == "function" and u.name in _ARITH_FUNCS)
               for u in users):
            continue  # a BN (or the model's own arithmetic) normalizes the input
        flat = t.detach().reshape(1, -1) if t.dim() < 2 else \
            t.detach().transpose(0, 1).reshape(t.shape[1], -1)
        flat = flat.to(torch.float64)
        std, mean = torch.std_mean(flat, dim=1, correction=0)
        mean, std = mean.cpu(), std.cpu()
        lo, hi = INPUT_STD_RANGE
        far = (mean.abs() > INPUT_MEAN_LIMIT) | (std > hi) | ((std < lo) & (std > 0))
        far |= ~torch.isfinite(mean) | ~torch.isfinite(std)
        if not bool(far.any()):
            continue
        worst = int(torch.argmax(torch.where(far, mean.abs() + std, torch.zeros_like(std))))
        path = next((u.name for u in users if u.kind == "module"), "")
        found.append(Finding(
            "BN007", "warning", path,
            f"{label} {tuple(t.shape)}: {int(far.sum())} of {len(mean)} channel(s) far from "
            f"mean 0, std 1 (channel {worst}: mean {float(mean[worst]):.4g}, std "
            f"{float(std[worst]):.4g})", (path,) if path else (), "input",
            details={"input": label, "mean": mean.tolist()[:64], "std": std.tolist()[:64]}))
    return found


# ------------------------------------------------------ what the run showed ---

def _trains_on_batch(model: nn.Module, m: nn.Module) -> bool:
    """In training, ``m`` normalizes with batch statistics: it is not deliberately
    frozen (in eval mode inside a model in train mode), or has no running statistics."""
    return m.running_mean is None or m.training or not model.training


def run_findings(model, calls, intent, per_device_batch, example_batch, min_batch):
    found = []
    small = []
    modules = dict(model.named_modules())
    scale = per_device_batch / example_batch if per_device_batch and example_batch else 1.0
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for path, call in calls.items():
        m = modules[path]
        sync = _is_sync(m) and distributed
        if call.batch_stats and call.values == 1 and not sync:
            note = " (the doctor ran this call in eval mode to go on)" if call.flipped else ""
            found.append(Finding("BN005", "error", path, f"input of shape {call.shape} in "
                                 f"training: one value per channel{note}", (path,), "run",
                                 details={"shape": list(call.shape)}))
        training_here = intent == "train" and _trains_on_batch(model, m)
        if training_here and per_device_batch and not sync:
            batch = max(1, round(call.shape[0] * scale))
            per_channel = batch * (call.values // max(call.shape[0], 1))
            if per_channel == 1 and not (call.batch_stats and call.values == 1):
                found.append(Finding(
                    "BN005", "error", path, f"with per_device_batch={per_device_batch} its "
                    f"input would be {(batch, *call.shape[1:])}: one value per channel",
                    (path,), "run", details={"shape": [batch, *call.shape[1:]]}))
        plain = not (_is_sync(m) or isinstance(m, (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d))
                     or getattr(m, "virtual_batch_size", None))
        if training_here and plain:
            batch = max(1, round(call.shape[0] * scale))
            if batch < min_batch:
                small.append((path, batch))
        if not call.batch_stats or intent == "eval":
            stale = _staleness(m, call)
            if stale is not None:
                rms, shift = stale
                found.append(Finding(
                    "BN010", "warning", path, f"normalized with its running statistics, the "
                    f"example batch has a root mean square of {rms:.3g} (about 1 when they fit; "
                    f"mean shift {shift:.3g} running std)", (path,), "run",
                    details={"rms": rms, "mean_shift": shift}))
    if small:
        batch = min(b for _, b in small)
        source = f"per_device_batch={per_device_batch}" if per_device_batch else \
            "the example's batch"
        found.append(Finding(
            "BN006", "warning", "" if len(small) > 1 else small[0][0],
            f"{batch} sample(s) per device ({source}) reach {len(small)} BN layer(s) in "
            f"training; below {min_batch} batch statistics are too noisy",
            tuple(p for p, _ in small), "run", details={"batch": batch, "min_batch": min_batch}))
    return found


def _staleness(m: nn.Module, call: LayerCall) -> tuple[float, float] | None:
    """(RMS of the normalized batch, RMS mean shift) when outside the limits, else None.

    Per channel, the batch normalized with the running statistics has mean
    ``(mean - running_mean) / std`` and second moment ``shift**2 + var / running_var``;
    their average over channels stays near 1 even for a batch of one sample,
    unlike per-channel variance ratios, which explode on sparse channels."""
    if not is_bn(m) or m.running_mean is None or call.mean is None or never_updated(m):
        return None
    rm = m.running_mean.detach().to("cpu", torch.float64)
    rv = m.running_var.detach().to("cpu", torch.float64) + m.eps
    if not (torch.isfinite(rm).all() and torch.isfinite(rv).all() and (rv > 0).all()):
        return None  # BN009's business
    if not (torch.isfinite(call.mean).all() and torch.isfinite(call.var).all()):
        return None  # the consequence of a non-finite layer upstream
    shift = (call.mean - rm) / rv.sqrt()
    rms = math.sqrt(float((shift**2 + call.var / rv).mean()))
    lo, hi = STALE_RMS_RANGE if call.shape[0] > 1 else STALE_RMS_RANGE_ONE_SAMPLE
    if lo <= rms <= hi:
        return None
    return rms, math.sqrt(float((shift**2).mean()))
