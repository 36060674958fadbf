r"""``fold_batchnorm``: BN folded into the convolution or linear layer before it, for inference.

In inference mode a BN layer is a fixed per-channel affine map, and a
convolution (or a linear layer) followed by a per-channel affine map is one
convolution with scaled weights and a new bias::

    scale = gamma / sqrt(running_var + eps)                  # (C,)
    W'    = W * scale      (along the output-channel axis)
    b'    = (b - running_mean) * scale + beta

so the folded network computes the same outputs with one layer fewer: no
BN pass over the activations at all. :func:`fold_conv_bn_weights` is the
tensor formula, :func:`fold_conv_bn` one layer pair, :func:`fold_batchnorm`
a whole model. The fold is computed in float64 and rounded once to the
layer's dtype.

The output-channel axis is axis 0 of ``Conv1d/2d/3d`` and ``Linear``
weights, ``(C_out, C_in / groups, *kernel)``; ``ConvTranspose1d/2d/3d``
weights are ``(C_in, C_out / groups, *kernel)``, so there output channel
``g * C_out / groups + j`` is column ``j`` of group ``g``'s rows.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ..nn.batchnorm import _OursMixin
from ..nn.frozen import FrozenBatchNorm
from ._common import (
    activation_module,
    call_sites,
    display,
    is_batchnorm,
    is_foreign_frozen,
    is_timm_bn_act,
    require_batchnorm,
    sequential_pairs,
    set_submodule,
    timm_act,
    trace,
)

__all__ = ["FOLDABLE_LAYERS", "fold_batchnorm", "fold_conv_bn", "fold_conv_bn_weights"]

# Exact types: a subclass may transform its weight (weight standardization,
# "same" padding wrappers are fine but cannot be told apart from the rest).
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d, nn.Linear)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def fold_conv_bn_weights(weight: torch.Tensor, bias: torch.Tensor | None,
                         running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                         bn_weight: torch.Tensor | None = None,
                         bn_bias: torch.Tensor | None = None, *, transposed: bool = False,
                         groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the layer that computes ``bn(layer(x))`` in inference mode.

    Args:
        weight: the conv or linear weight: ``(C_out, C_in / groups, *kernel)``,
            ``(C_out, C_in)``, or for a transposed conv ``(C_in, C_out / groups, *kernel)``.
        bias: its bias ``(C_out,)``, or ``None``.
        running_mean, running_var: the BN's ``(C_out,)`` statistics.
        eps: the BN's ``eps``.
        bn_weight, bn_bias: the BN's ``gamma`` and ``beta``, or ``None`` (``affine=False``:
            1 and 0).
        transposed: ``weight`` is a ``ConvTranspose`` weight. Default: ``False``.
        groups: the transposed conv's ``groups`` (ignored otherwise). Default: ``1``.

    Returns:
        ``(weight, bias)``: new tensors in ``weight``'s dtype and device, not
        attached to any autograd graph.

    Raises:
        ValueError: the BN's channel count is not the layer's output-channel count.

    Example:
        >>> import torch
        >>> conv, bn = torch.nn.Conv2d(3, 4, 3).eval(), torch.nn.BatchNorm2d(4).eval()
        >>> bn.running_mean.fill_(0.5); bn.running_var.fill_(4.0)  # doctest: +ELLIPSIS
        tensor(...)
        >>> w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
        ...                             bn.running_var, bn.eps, bn.weight, bn.bias)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-6)
        True
    """
    if transposed:
        if weight.dim() < 3 or weight.shape[0] % groups:
            raise ValueError(f"a transposed conv weight of shape {tuple(weight.shape)} does "
                             f"not split into {groups} groups")
        out_channels = groups * weight.shape[1]
    else:
        out_channels = weight.shape[0]
    for what, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bias", bias)):
        if t is not None and tuple(t.shape) != (out_channels,):
            raise ValueError(f"{what} has shape {tuple(t.shape)}; the layer has "
                             f"{out_channels} output channels")
    with torch.no_grad():
        cdtype = torch.float32 if weight.device.type == "mps" else torch.float64
        scale = torch.rsqrt(running_var.to(cdtype) + eps)
        if bn_weight is not None:
            scale = scale * bn_weight.to(cdtype)
        shift = -running_mean.to(cdtype) * scale
        if bn_bias is not None:
            shift = shift + bn_bias.to(cdtype)
        w = weight.to(cdtype)
        if transposed:
            k = weight.shape[2:]
            w = (w.reshape(groups, weight.shape[0] // groups, weight.shape[1], *k)
                 * scale.reshape(groups, 1, weight.shape[1], *([1] * len(k))))
            w = w.reshape(weight.shape)
        else:
            w = w * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        b = shift if bias is None else bias.to(cdtype) * scale + shift
        return (w.to(weight.dtype).contiguous(memory_format=_memory_format(weight)),
                b.to(weight.dtype))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) \
            and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _bn_tensors(bn: nn.Module):
    """``(running_mean, running_var, eps, weight, bias)`` of a BN in inference mode."""
    return (bn.running_mean, bn.running_var, bn.eps, getattr(bn, "weight", None),
            getattr(bn, "bias", None))


def _bn_refusal(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded anywhere (its inference map is not fixed)."""
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        return "is lazy and not initialised yet (run one forward first)"
    if isinstance(bn, _BatchNorm):
        if bn.running_mean is None or bn.running_var is None:
            return ("has no running statistics (track_running_stats=False): it normalizes "
                    "with batch statistics even in eval mode, which no weight can hold")
        if bn.training:
            return "is in training mode: fold is for inference, call model.eval() first"
    return None


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.out_channels


def _known(bn: nn.Module) -> bool:
    """Whether ``bn``'s inference output is the BN formula (then its fused or attached
    activation): PyTorch's exact classes, ours, frozen layers, timm's ``BatchNormAct2d``."""
    return (type(bn) in _TORCH_BN or isinstance(bn, (_OursMixin, FrozenBatchNorm))
            or is_foreign_frozen(bn) or is_timm_bn_act(bn))


def _pair_why_not(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot go into ``layer`` (``None``: it can)."""
    if not _known(bn):
        return (f"is a {type(bn).__module__}.{type(bn).__qualname__}, a subclass whose "
                "inference output fold cannot know")
    if type(layer) not in FOLDABLE_LAYERS:
        return f"follows a {type(layer).__name__}, not a conv or linear layer"
    if getattr(bn, "axis", 1) != 1:
        return f"normalizes axis {bn.axis}, not the layer's channel axis"
    channels = bn.running_mean.numel()
    if channels != _out_channels(layer):
        return (f"has {channels} channels; the {type(layer).__name__} before it has "
                f"{_out_channels(layer)}")
    return None


def fold_conv_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` that computes ``bn(layer(x))`` in inference mode.

    ``layer``: ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear``
    (a ``Linear`` before ``BatchNorm1d`` on ``(N, C)`` input); ``bn``: a BN
    layer in eval mode with running statistics (ours, PyTorch's, frozen).
    The copy's weight and bias are new ``Parameter`` s (a bias is added if the
    layer had none) with the layer's ``requires_grad``. A fused activation
    of ``bn`` is not part of the copy: see :func:`fold_batchnorm`.

    Raises:
        ValueError: ``bn`` is in training mode or has no running statistics,
            or the two do not fit (layer type, channel count).
    """
    why = _bn_refusal(bn) or _pair_why_not(layer, bn)
    if why:
        raise ValueError(f"cannot fold {type(bn).__name__} into {type(layer).__name__}: "
                         f"the batch norm {why}")
    w, b = fold_conv_bn_weights(layer.weight, layer.bias, *_bn_tensors(bn),
                                transposed=isinstance(layer, _TRANSPOSED),
                                groups=getattr(layer, "groups", 1))
    new = copy.deepcopy(layer)
    grad = layer.weight.requires_grad
    new.weight = nn.Parameter(w, requires_grad=grad)
    new.bias = nn.Parameter(b, requires_grad=grad if layer.bias is None
                            else layer.bias.requires_grad)
    return new


def _after(bn: nn.Module) -> nn.Module:
    """What stays where ``bn`` was: its fused activation as a module (timm's drop and act
    modules), or an identity."""
    if is_timm_bn_act(bn):
        drop, act = timm_act(bn)
        return act if type(drop) is nn.Identity else nn.Sequential(drop, act)
    activation = getattr(bn, "activation", None)
    if activation is None:
        return nn.Identity()
    return activation_module(activation, getattr(bn, "negative_slope", 0.01))


def fold_batchnorm(model: nn.Module, *, trace: bool | str = "auto",
                   strict: bool = False) -> nn.Module:
    """Fold every BN layer of an inference model into the conv or linear layer before it.

    A BN layer is folded when the layer right before it is an exact
    ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` with as many
    output channels, whose output goes nowhere else: neighbours in an
    ``nn.Sequential``, or, once the model is traced with ``torch.fx`` (BN
    layers as leaves), a conv node whose only user is the BN node. The layer
    is replaced by :func:`fold_conv_bn`'s copy; the BN by an ``nn.Identity``,
    or by its fused activation as a module (``activation="relu"`` leaves an
    ``nn.ReLU``); our BN's fused ``residual`` becomes an addition node. BN
    layers with nothing to fold into (after a pooling, an addition, the
    input) stay, in eval mode. A ``Linear`` is assumed to feed
    ``BatchNorm1d`` ``(N, C)`` input (its features on axis 1).

    Args:
        model: the model, in eval mode.
        trace: ``False``: fold neighbours in ``nn.Sequential`` containers only,
            in place. ``True``: trace the model with ``torch.fx`` and fold in
            the graph (a ``TypeError`` if it cannot be traced). ``"auto"``:
            ``nn.Sequential`` neighbours in place if that folds every BN that
            is there to fold, else the traced graph when the model traces,
            else the ``nn.Sequential`` neighbours. A ``torch.fx.GraphModule``
            is always folded in its graph, in place. Default: ``"auto"``.
        strict: raise (before changing anything) if a BN layer would stay
            unfolded. Default: ``False``.

    Returns:
        ``model``, folded in place, or a new ``torch.fx.GraphModule`` (when
        traced) that shares ``model``'s unfolded layers; ``model`` is then
        not changed. The result computes ``model``'s eval outputs (within
        float32 rounding).

    Raises:
        ValueError: ``model`` or one of its BN layers is in training mode; a
            BN layer has no running statistics (``track_running_stats=False``:
            its eval output depends on the batch); ``model`` has no BN layer;
            ``strict`` and a BN layer cannot be folded.
        TypeError: ``trace=True`` and the model cannot be traced.

    Example:
        >>> import torch
        >>> from batchnorm.tools import fold_batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                           torch.nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = net(x)
        >>> net = fold_batchnorm(net)
        >>> [type(m).__name__ for m in net]
        ['Conv2d', 'Identity', 'ReLU']
        >>> torch.allclose(net(x), y, atol=1e-6)
        True
    """
    if trace not in (True, False, "auto"):
        raise ValueError(f"trace must be True, False or 'auto', got {trace!r}")
    layers = require_batchnorm(model, "fold_batchnorm")
    if model.training:
        raise ValueError("fold_batchnorm is for inference: the model is in training mode; "
                         "call model.eval() first")
    refused = [f"{display(n)} {why}" for n, m in layers if (why := _bn_refusal(m))]
    if refused:
        raise ValueError("fold_batchnorm: cannot fold a model whose batch norm "
                         + "; ".join(refused))

    if isinstance(model, fx.GraphModule):
        plan, left = _plan_graph(model)
        _check_strict(strict, left)
        return _fold_graph(model, plan)
    seq_plan, seq_left = _plan_sequential(model)
    if trace is False or (trace == "auto" and not seq_left):
        _check_strict(strict, seq_left)
        return _fold_sequential(model, seq_plan)
    try:
        gm = _trace(model)
    except TypeError:
        if trace is True:
            raise
        _check_strict(strict, seq_left)
        return _fold_sequential(model, seq_plan)
    plan, left = _plan_graph(gm)
    _check_strict(strict, left)
    return _fold_graph(gm, plan)


def _trace(model):
    return trace(model, "fold_batchnorm")


def _check_strict(strict, left):
    if strict and left:
        raise ValueError("fold_batchnorm(strict=True): these batch norm layers cannot be "
                         "folded: " + "; ".join(f"{display(n)} {why}" for n, why in left))


def _plan_sequential(model):
    """``[(sequential, key_a, a, key_b, bn)]`` to fold; ``[(name, why)]`` of the BN left."""
    plan, folded = [], set()
    for seq, key_a, a, key_b, b in sequential_pairs(model):
        if is_batchnorm(b) and _pair_why_not(a, b) is None and id(b) not in folded:
            plan.append((seq, key_a, a, key_b, b))
            folded.add(id(b))
    left = [(n, "does not follow a foldable layer in an nn.Sequential")
            for n, m in model.named_modules() if is_batchnorm(m) and id(m) not in folded]
    return plan, left


def _fold_sequential(model, plan):
    for seq, key_a, a, key_b, bn in plan:
        seq._modules[key_a] = fold_conv_bn(a, bn)
        seq._modules[key_b] = _after(bn)
    return model


def _plan_graph(gm: fx.GraphModule):
    """``[(bn node, layer node)]`` to fold; ``[(target, why)]`` of the BN calls left."""
    sites = call_sites(gm)
    plan, left = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_batchnorm(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        prev = node.args[0] if node.args else node.kwargs.get("input")
        why = None
        if not isinstance(prev, fx.Node) or prev.op != "call_module":
            why = "does not follow a module call"
        elif len(prev.users) != 1:
            why = f"follows {prev.target}, whose output is used elsewhere too"
        elif sites[prev.target] != 1 or sites[node.target] != 1:
            why = "is (or follows) a module called more than once"
        else:
            why = _pair_why_not(gm.get_submodule(prev.target), bn)
        if why:
            left.append((node.target, why))
        else:
            plan.append((node, prev))
    return plan, left


def _fold_graph(gm: fx.GraphModule, plan) -> fx.GraphModule:
    graph = gm.graph
    for node, prev in plan:
        bn = gm.get_submodule(node.target)
        set_submodule(gm, prev.target, fold_conv_bn(gm.get_submodule(prev.target), bn))
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        out = prev
        if residual is not None:
            with graph.inserting_before(node):
                out = graph.call_function(torch.add, (prev, residual))
        if getattr(bn, "activation", None) is not None or is_timm_bn_act(bn):
            set_submodule(gm, node.target, _after(bn))
            node.args, node.kwargs = (out,), {}
        else:
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            gm.delete_submodule(node.target)
    graph.lint()
    gm.recompile()
    return gm
