"""What the model tools share: finding BN layers, activations, tracing with torch.fx.

Private to :mod:`batchnorm.tools`. A "BN layer" here is any
``torch.nn.modules.batchnorm._BatchNorm`` (PyTorch's, ours, SyncBatchNorm,
renorm, timm's ``BatchNormAct2d``), our :class:`~batchnorm.FrozenBatchNorm`,
and a frozen layer from torchvision or detectron2 (a leaf whose class name
says ``FrozenBatchNorm`` and which holds ``running_mean`` and ``running_var``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.frozen import FrozenBatchNorm

_FROZEN_NAME = re.compile(r"FrozenBatchNorm", re.IGNORECASE)


def is_foreign_frozen(m: nn.Module) -> bool:
    """A frozen BN from another library (torchvision's, detectron2's)."""
    return (not isinstance(m, (_BatchNorm, FrozenBatchNorm))
            and bool(_FROZEN_NAME.search(type(m).__name__))
            and isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor))


# timm's norm + activation layers: a BN's state and op, then ``drop`` and ``act`` modules.
_TIMM_NORM_ACT = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")


def timm_act(m: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(drop, act)`` of timm's ``BatchNormAct2d``, ``SyncBatchNormAct`` (whose ``drop``
    and ``act`` may be missing: identities) and ``FrozenBatchNormAct2d``; else ``None``."""
    if type(m).__name__ not in _TIMM_NORM_ACT:
        return None
    if not (isinstance(m, _BatchNorm) or is_foreign_frozen(m)):
        return None
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    if not all(v is None or isinstance(v, nn.Module) for v in (drop, act)):
        return None
    return (nn.Identity() if drop is None else drop), (nn.Identity() if act is None else act)


def is_timm_bn_act(m: nn.Module) -> bool:
    return timm_act(m) is not None


def is_batchnorm(m: nn.Module) -> bool:
    """Whether ``m`` is a batch-norm layer (see the module docstring)."""
    return isinstance(m, (_BatchNorm, FrozenBatchNorm)) or is_foreign_frozen(m)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every BN layer, each shared layer once."""
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def require_batchnorm(model: nn.Module, tool: str) -> list[tuple[str, nn.Module]]:
    """The BN layers of ``model``; a ``ValueError`` naming ``tool`` if there are none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{tool} expects a torch.nn.Module, got {type(model).__name__}")
    layers = bn_layers(model)
    if not layers:
        raise ValueError(f"{tool}: {type(model).__name__} has no batch-norm layer (no "
                         "torch.nn.BatchNorm*, SyncBatchNorm or FrozenBatchNorm among its "
                         "modules); was the right model passed?")
    return layers


def display(name: str) -> str:
    return name or "<root>"


def occurrences(model: nn.Module) -> dict[int, int]:
    """How many places of the module tree hold each module (by ``id``)."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def sequential_pairs(model: nn.Module):
    """``(sequential, key_a, a, key_b, b)`` for every two neighbours ``a``, ``b`` in every
    ``nn.Sequential`` of ``model`` whose forward is ``nn.Sequential``'s (so ``b`` gets
    exactly ``a``'s output)."""
    for seq in model.modules():
        if isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward:
            items = [(k, m) for k, m in seq._modules.items() if m is not None]
            for (key_a, a), (key_b, b) in zip(items[:-1], items[1:], strict=True):
                yield seq, key_a, a, key_b, b


# ---------------------------------------------------------------- activations

# The activations our ``activation=`` computes, by exact module type (a
# subclass may compute something else). GELU only in its exact erf form.
_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.GELU: "gelu",
            nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}


def activation_of(m: nn.Module) -> tuple[str, float] | None:
    """``(name, negative_slope)`` of an activation module ours can fuse, else ``None``."""
    name = _MODULES.get(type(m))
    if name is None or (name == "gelu" and m.approximate != "none"):
        return None
    return name, float(m.negative_slope) if name == "leaky_relu" else 0.01


def activation_module(name: str, negative_slope: float = 0.01) -> nn.Module:
    """A ``torch.nn`` module computing our activation ``name``."""
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
            "tanh": nn.Tanh}[name]()


_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
              F.leaky_relu: "leaky_relu", F.silu: "silu", F.gelu: "gelu",
              torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
              F.tanh: "tanh"}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
            "tanh": "tanh", "tanh_": "tanh"}


def activation_of_node(node: fx.Node, gm: fx.GraphModule) -> tuple[str, float] | None:
    """``(name, negative_slope)`` if ``node`` applies a fusable activation to its first
    argument and nothing else, else ``None``."""
    if node.op == "call_module":
        return activation_of(gm.get_submodule(node.target))
    if node.op == "call_method":
        name = _METHODS.get(node.target)
        return (name, 0.01) if name and len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function":
        return None
    name = _FUNCTIONS.get(node.target)
    if name is None:
        return None
    extra = list(node.args[1:])
    kwargs = dict(node.kwargs)
    kwargs.pop("inplace", None)  # the output replaces the input either way
    if name in ("relu", "silu") and len(extra) <= 1:  # positional inplace
        return (name, 0.01) if not kwargs else None
    if name == "leaky_relu":
        slope = extra[0] if extra else kwargs.pop("negative_slope", 0.01)
        ok = isinstance(slope, (int, float)) and len(extra) <= 2 and not kwargs
        return (name, float(slope)) if ok else None
    if name == "gelu":
        approximate = kwargs.pop("approximate", "none")
        return (name, 0.01) if approximate == "none" and not extra and not kwargs else None
    return (name, 0.01) if not extra and not kwargs else None


def activation_call(name: str, negative_slope: float):
    """``(function, extra args)`` that apply activation ``name`` in a graph."""
    if name == "leaky_relu":
        return F.leaky_relu, (negative_slope,)
    return {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid,
            "tanh": torch.tanh}[name], ()


# ---------------------------------------------------------------- torch.fx

# Regularizers that branch on ``self.training`` in Python (torchvision's
# StochasticDepth, timm's DropPath and DropBlock2d): traced through, the graph
# would keep the branch of the mode the model was in when traced.
_MODE_DEPENDENT = re.compile(r"StochasticDepth|DropPath|DropBlock|Dropout", re.IGNORECASE)


class BNTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps every BN layer a leaf (one ``call_module`` node).

    The default tracer only keeps ``torch.nn``'s own modules whole; it would
    trace into ours and into timm's ``BatchNormAct2d`` and leave no layer to
    convert or fold. Stochastic depth, drop-path and drop-block modules stay
    leaves too, so the graph keeps their training/inference switch. Other
    Python branches on ``self.training`` in a model's own code are recorded
    as they went while tracing (a torch.fx limitation).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (is_batchnorm(m) or bool(_MODE_DEPENDENT.search(type(m).__name__))
                or super().is_leaf_module(m, module_qualified_name))


def trace(model: nn.Module, tool: str) -> fx.GraphModule:
    """``model`` as a ``GraphModule`` (itself if it is one); a ``TypeError`` if it cannot
    be traced symbolically."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = BNTracer().trace(model)
    except Exception as error:  # tracing fails in many ways (control flow, proxies)
        raise TypeError(f"{tool}: {type(model).__name__} cannot be traced with torch.fx "
                        f"({type(error).__name__}: {error}); use trace=False (nn.Sequential "
                        "pairs only) or make the model traceable") from error
    gm = fx.GraphModule(model, graph, type(model).__name__)
    # The containers fx made anew take the originals' mode; shared leaves keep theirs.
    for name, m in gm.named_modules():
        try:
            m.training = model.get_submodule(name).training
        except AttributeError:
            pass
    return gm


def call_sites(gm: fx.GraphModule) -> dict[str, int]:
    """How many ``call_module`` nodes call each submodule target."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at ``target`` of ``gm`` (replacing what is there)."""
    parent, _, field = target.rpartition(".")
    gm.get_submodule(parent).add_module(field, module)

