"""``convert_batchnorm``: a model's BN layers to ours, to PyTorch's, to SyncBatchNorm, or frozen.

One entry point over the converters the modules already have
(:func:`~batchnorm.convert_sync_batchnorm` and
:meth:`~batchnorm.FrozenBatchNorm.from_batchnorm`), plus the two conversions
between PyTorch's classes and ours, and the optional fusion of a BN with the
activation after it into our ``activation=``.

**Everything is checked before anything changes.** Every BN layer's fate is
decided first; a layer that cannot be converted faithfully (a subclass with
its own behaviour, a lazy layer not initialised yet, ...) is an error that
names every such layer, unless ``unknown="skip"``, and the model is left as
it was.

**What is kept.** A converted layer holds the very ``Parameter`` and buffer
objects of the old one (so ``requires_grad``, device, dtype and an
optimizer's references survive), its training flag, ``eps`` and
``momentum``; frozen layers copy the buffers (see
:meth:`~batchnorm.FrozenBatchNorm.from_batchnorm`). Hooks on the old layer
are not carried over.
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _OursMixin
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNorm2d, _frozen_class
from ..nn.sync import (
    _REVERT_NAMES,
    _SYNC_TYPES,
    SyncBatchNorm,
    _move_state,
    _why_not,
    convert_sync_batchnorm,
)
from ._common import (
    activation_call,
    activation_of,
    activation_of_node,
    call_sites,
    display,
    is_batchnorm,
    is_foreign_frozen,
    is_timm_bn_act,
    occurrences,
    require_batchnorm,
    sequential_pairs,
    timm_act,
    trace,
)

__all__ = ["TARGETS", "FusedActivation", "convert_batchnorm"]

TARGETS = ("ours", "torch", "sync", "frozen")

_OURS_OF = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_TORCH_OF = {ours: theirs for theirs, ours in _OURS_OF.items()}
_OUR_OPTIONS = ("activation", "negative_slope", "backend", "check_finite")
_SYNC_KNOWN = set(_REVERT_NAMES) | set(_SYNC_TYPES)


class FusedActivation(nn.Identity):
    """Stands where an activation was, once :func:`convert_batchnorm` fused it into the BN
    before it; ``convert_batchnorm(model, to="torch")`` puts the original back.

    The original module is kept as a plain attribute, not a submodule, so the
    model's ``state_dict``, ``modules()`` and hooks do not see it.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "original", original)
        self.train(original.training)

    def extra_repr(self) -> str:
        return f"fused into the batch norm before: {self.original!r}"


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _unknown_subclass(m: nn.Module) -> str:
    return f"is a {_qualname(m)}, a subclass whose behaviour the conversion cannot keep"


def _bn_args(m):
    return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)


def _to_ours(m: nn.Module):
    """``(layer, None)``: ``m`` as ours (``m`` itself if it already is), or ``(None, why not)``."""
    if isinstance(m, (_OursMixin, FrozenBatchNorm)):
        return m, None
    if type(m) in _OURS_OF:
        new = _OURS_OF[type(m)](*_bn_args(m), device="meta", bias=m.bias is not None)
        return _move_state(m, new), None
    if type(m) is nn.SyncBatchNorm:
        new = SyncBatchNorm(*_bn_args(m), m.process_group, device="meta",
                            bias=m.bias is not None)
        return _move_state(m, new), None
    if is_timm_bn_act(m):
        drop, act_module = timm_act(m)
        name = type(m).__name__
        if type(drop) is not nn.Identity:
            return None, f"is timm's {name} with a drop layer ({drop!r}) between the BN and " \
                         "its activation"
        act = None if type(act_module) is nn.Identity else activation_of(act_module)
        if act is None and type(act_module) is not nn.Identity:
            return None, f"is timm's {name} with an activation ours cannot fuse " \
                         f"({act_module!r})"
        if isinstance(m, nn.SyncBatchNorm):
            new = _move_state(m, SyncBatchNorm(*_bn_args(m), m.process_group, device="meta",
                                               bias=m.bias is not None))
        elif isinstance(m, _BatchNorm):
            new = _move_state(m, BatchNorm2d(*_bn_args(m), device="meta",
                                             bias=m.bias is not None))
        else:
            new = FrozenBatchNorm2d.from_batchnorm(m)
        if act is not None:
            new.activation, new.negative_slope = act
        return new, None
    if is_foreign_frozen(m):
        cls = FrozenBatchNorm2d if type(m).__name__.endswith("2d") else FrozenBatchNorm
        return cls.from_batchnorm(m), None
    if isinstance(m, _BatchNorm):
        if type(m).__name__.startswith("Lazy") and m.has_uninitialized_params():
            return None, "is lazy and not initialised yet (run one forward first)"
        return None, _unknown_subclass(m)
    return None, f"is a {_qualname(m)}, which the conversion does not know"


def _torch_why_not(m: nn.Module) -> str | None:
    """Why our layer ``m`` cannot become PyTorch's (``None``: it can)."""
    if getattr(m, "virtual_batch_size", None) is not None:
        return "uses ghost batches (virtual_batch_size), which torch.nn does not have"
    if type(m) in _TORCH_OF or type(m) is SyncBatchNorm:
        return None
    if isinstance(m, FrozenBatchNorm):
        return "is frozen; torch.nn has no frozen batch norm"
    if isinstance(m, _BatchNorm) and type(m).__name__ == "BatchNorm":
        return "is our rank-agnostic BatchNorm; torch.nn's layers are per rank"
    return f"is our {type(m).__name__}, which torch.nn has no equivalent of"


def _to_torch(m: nn.Module) -> nn.Module:
    if type(m) is SyncBatchNorm:
        new = nn.SyncBatchNorm(*_bn_args(m), m.process_group, device="meta")
    else:
        new = _TORCH_OF[type(m)](*_bn_args(m), device="meta")
    _move_state(m, new)
    for name in _OUR_OPTIONS:  # PyTorch's layer would carry them, unused
        new.__dict__.pop(name, None)
    return new


def _target_why_not(p: nn.Module, to: str) -> str | None:
    """Why ``p`` (already ours) cannot take the last step to ``to``; ``None`` if it can or
    need not."""
    if to == "ours" or isinstance(p, FrozenBatchNorm) or is_foreign_frozen(p):
        return None
    if to == "sync":
        return None if isinstance(p, SyncBatchNorm) else _why_not(p, _SYNC_KNOWN)
    if getattr(p, "running_mean", None) is None or getattr(p, "running_var", None) is None:
        return "has no running statistics (track_running_stats=False): nothing to freeze"
    if getattr(p, "axis", 1) != 1:
        return f"normalizes axis {p.axis}; frozen layers normalize axis 1"
    return _why_not(p, {type(p)})  # lazy layers not initialised yet


def _to_target(p: nn.Module, to: str, process_group) -> nn.Module:
    if to == "ours" or isinstance(p, FrozenBatchNorm) or is_foreign_frozen(p):
        return p
    if to == "sync":
        return p if isinstance(p, SyncBatchNorm) else convert_sync_batchnorm(p, process_group)
    return _frozen_class(p).from_batchnorm(p)


def _shallow_copy(m: nn.Module) -> nn.Module:
    """A new module object holding ``m``'s very parameters, buffers and children."""
    new = copy.copy(m)
    for attr in ("_parameters", "_buffers", "_modules", "_forward_hooks",
                 "_forward_pre_hooks", "_non_persistent_buffers_set"):
        if attr in m.__dict__:
            new.__dict__[attr] = copy.copy(m.__dict__[attr])
    return new


def convert_batchnorm(model: nn.Module, to: str = "ours", *, fuse_activation: bool | str = False,
                      process_group=None, unknown: str = "error") -> nn.Module:
    """Convert every batch-norm layer of ``model``.

    ``to``:

    * ``"ours"``: ``torch.nn.BatchNorm1d/2d/3d`` become our
      :class:`~batchnorm.BatchNorm1d`/``2d``/``3d``, ``torch.nn.SyncBatchNorm``
      our :class:`~batchnorm.SyncBatchNorm` (same process group), timm's
      ``BatchNormAct2d`` our ``BatchNorm2d`` with its activation fused (when
      ours has it and no drop layer sits between), torchvision's and
      detectron2's frozen layers our :class:`~batchnorm.FrozenBatchNorm2d`.
      Layers that already are ours are left as they are.
    * ``"torch"``: our ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` become
      PyTorch's. A fused activation goes back to a module where
      ``convert_batchnorm`` took it from (the :class:`FusedActivation` after
      the layer in an ``nn.Sequential``), or to a node after the layer in a
      ``torch.fx.GraphModule``; elsewhere PyTorch's layer has no place for it.
      Our layers that torch.nn has no equivalent of (frozen, renorm, ghost
      batches, the rank-agnostic ``BatchNorm``) are unknown layers, see
      ``unknown``. PyTorch's own layers are left as they are.
    * ``"sync"``: as ``"ours"``, then :func:`~batchnorm.convert_sync_batchnorm`
      (``process_group``); layers that already are our ``SyncBatchNorm`` keep
      their group; frozen layers stay frozen (they have no batch statistics
      to share).
    * ``"frozen"``: as ``"ours"``, then
      :meth:`~batchnorm.FrozenBatchNorm.from_batchnorm` (same eval output,
      buffers copied); frozen layers stay.

    Args:
        model: the model, or a single layer.
        to: ``"ours"``, ``"torch"``, ``"sync"`` or ``"frozen"``. Default: ``"ours"``.
        fuse_activation: fuse a BN with the activation module right after it
            (ReLU, LeakyReLU, SiLU, exact GELU, Sigmoid, Tanh: what our
            ``activation=`` computes) into the BN's ``activation``.
            ``True``: pairs of neighbours in every ``nn.Sequential`` (the
            activation is replaced by a :class:`FusedActivation`, an
            identity), and, if ``model`` is a ``torch.fx.GraphModule``, pairs
            in its graph (the activation's node is removed). ``"fx"``: trace
            ``model`` with ``torch.fx`` (BN layers as leaves) and fuse in the
            graph, wherever the BN's output goes only to the activation
            (``F.relu``, ``torch.sigmoid``, ``x.relu()``, a module...).
            Not with ``to="torch"``. Default: ``False``.
        process_group: for ``to="sync"``; ``None`` is the world. Default: ``None``.
        unknown: what to do with BN layers that cannot be converted
            faithfully: ``"error"`` raises a ``TypeError`` naming all of them
            before anything changes; ``"skip"`` leaves them as they are.
            Default: ``"error"``.

    Returns:
        ``model``, converted in place (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
        does); the new layer if ``model`` itself is a BN layer; with
        ``fuse_activation="fx"``, a new ``torch.fx.GraphModule`` sharing
        ``model``'s parameters, while ``model`` itself is not changed.

    Raises:
        ValueError: ``to``, ``fuse_activation`` or ``unknown`` is not one of
            the values above, or ``model`` has no batch-norm layer at all
            (almost always the wrong object was passed).
        TypeError: some layers cannot be converted (``unknown="error"``), or
            ``fuse_activation="fx"`` and ``model`` cannot be traced.

    Example:
        >>> import torch
        >>> from batchnorm.tools import convert_batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
        ...                           torch.nn.ReLU())
        >>> net = convert_batchnorm(net, fuse_activation=True)
        >>> type(net[1]).__module__, net[1].activation, type(net[2]).__name__
        ('batchnorm.nn.batchnorm', 'relu', 'FusedActivation')
        >>> net = convert_batchnorm(net, to="torch")
        >>> type(net[1]).__module__, type(net[2]).__name__
        ('torch.nn.modules.batchnorm', 'ReLU')
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {', '.join(map(repr, TARGETS))}, got {to!r}")
    if fuse_activation not in (False, True, "fx"):
        raise ValueError(f"fuse_activation must be False, True or 'fx', got {fuse_activation!r}")
    if fuse_activation and to == "torch":
        raise ValueError("fuse_activation needs our layers; to='torch' cannot hold a fused "
                         "activation")
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    require_batchnorm(model, "convert_batchnorm")
    traced = fuse_activation == "fx" and not isinstance(model, fx.GraphModule)
    root = trace(model, "convert_batchnorm") if fuse_activation == "fx" else model
    graph_mode = isinstance(root, fx.GraphModule)

    # 1. Decide every layer's fate; change nothing yet.
    layers = [(n, m) for n, m in root.named_modules() if is_batchnorm(m)]
    problems, first = [], {}  # first step: id -> the layer as ours (or PyTorch's)
    for name, m in layers:
        if to == "torch":
            why = None if not isinstance(m, (_OursMixin, FrozenBatchNorm)) else _torch_why_not(m)
            first[id(m)] = m
        else:
            p, why = _to_ours(m)
            why = why or _target_why_not(p, to)
            first[id(m)] = p
        if why:
            problems.append((name, m, why))

    fusions, unfusions = [], []
    if fuse_activation:
        fusions = _plan_fusions(root, graph_mode, first, {id(m) for _, m, _ in problems})
    if to == "torch":
        unfusions, more = _plan_unfusions(root, graph_mode)
        problems += [(n, m, w) for n, m, w in more if all(m is not q for _, q, _ in problems)]

    if problems and unknown == "error":
        raise TypeError("convert_batchnorm: cannot convert these batch-norm layers to "
                        f"{to!r} (pass unknown='skip' to leave them as they are): "
                        + "; ".join(f"{display(n)} {why}" for n, _, why in problems))

    # 2. Convert.
    skipped = {id(m) for _, m, _ in problems}
    fused = {id(m): act for m, act, *_ in fusions}
    final = {}
    for _, m in layers:
        if id(m) in skipped:
            continue
        if to == "torch":
            final[id(m)] = _to_torch(m) if isinstance(m, (_OursMixin, FrozenBatchNorm)) else m
            continue
        p = first[id(m)]
        if id(m) in fused:
            if traced and p is m:  # the caller's model must keep its own layer unchanged
                p = _shallow_copy(m)
            p.activation, p.negative_slope = fused[id(m)]
        final[id(m)] = _to_target(p, to, process_group)

    unfusions = [u for u in unfusions if id(u[0]) not in skipped]
    new_root = _replace(root, final)
    if graph_mode:
        _rewrite_graph(new_root, fusions, unfusions)
    else:
        for _, _, seq, key, act in fusions:
            seq._modules[key] = FusedActivation(act)
        for _, seq, key in unfusions:
            seq._modules[key] = seq._modules[key].original
    return new_root


def _plan_fusions(root, graph_mode, first, problems):
    """``(layer, (name, slope), where...)`` for every BN the activation after it can go into."""
    def fusable(bn):
        p = first.get(id(bn))
        return (id(bn) not in problems and p is not None and hasattr(p, "negative_slope")
                and getattr(p, "activation", "") is None)

    plans = []
    if graph_mode:
        sites = call_sites(root)
        for node in root.graph.nodes:
            if node.op != "call_module" or sites[node.target] != 1:
                continue
            bn = root.get_submodule(node.target)
            if not fusable(bn) or len(node.users) != 1:
                continue
            # Look through identities (timm's drop_block=None, a disabled dropout).
            prev, user = node, next(iter(node.users))
            while (user.op == "call_module" and user.args == (prev,) and not user.kwargs
                   and type(root.get_submodule(user.target)) is nn.Identity
                   and len(user.users) == 1):
                prev, user = user, next(iter(user.users))
            act = activation_of_node(user, root) if user.args[:1] == (prev,) else None
            if act is not None:
                plans.append((bn, act, node, user, prev))
        return plans
    shared = occurrences(root)
    for seq, _, a, key, b in sequential_pairs(root):
        act = activation_of(b)
        if act is not None and fusable(a) and shared[id(a)] == 1:
            plans.append((a, act, seq, key, b))
    return plans


def _plan_unfusions(root, graph_mode):
    """Where each of our layers with a fused activation gives it back, as
    ``(layer, sequential, key)`` or ``(layer, node, (name, slope))``; and the layers that
    have no such place."""
    fused = [(n, m) for n, m in root.named_modules()
             if isinstance(m, (_OursMixin, FrozenBatchNorm)) and m.activation is not None]
    if not fused:
        return [], []
    if graph_mode:
        return [(root.get_submodule(node.target), node,
                 (root.get_submodule(node.target).activation,
                  root.get_submodule(node.target).negative_slope))
                for node in root.graph.nodes if node.op == "call_module"
                and any(m is root.get_submodule(node.target) for _, m in fused)], []
    places, found = [], set()
    shared = occurrences(root)
    for seq, _, a, key, b in sequential_pairs(root):
        if isinstance(b, FusedActivation) and getattr(a, "activation", None) is not None \
                and shared[id(a)] == 1:
            places.append((a, seq, key))
            found.add(id(a))
    problems = [(n, m, f"has a fused activation ({m.activation!r}) that torch.nn's batch norm "
                       "cannot hold, and no FusedActivation after it in an nn.Sequential to "
                       "give it back to")
                for n, m in fused if id(m) not in found]
    return places, problems


def _replace(root: nn.Module, final: dict[int, nn.Module]) -> nn.Module:
    """Put ``final[id(layer)]`` wherever ``layer`` is in the tree (shared layers stay shared)."""
    if id(root) in final:
        return final[id(root)]
    for m in list(root.modules()):
        for key, child in list(m._modules.items()):
            if child is not None and id(child) in final and final[id(child)] is not child:
                m._modules[key] = final[id(child)]
    return root


def _rewrite_graph(gm: fx.GraphModule, fusions, unfusions) -> None:
    graph = gm.graph
    for _, _, _, user, prev in fusions:
        user.replace_all_uses_with(prev)
        graph.erase_node(user)
    for _, node, act in unfusions:
        fn, extra = activation_call(*act)
        with graph.inserting_after(node):
            new = graph.call_function(fn, (node, *extra))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    graph.lint()
    gm.recompile()
