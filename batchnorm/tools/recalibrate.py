r"""``recalibrate_batchnorm``: exact population statistics for every BN layer ("precise BN").

The running statistics a BN layer ends training with are an exponential
moving average over the last few hundred batches, taken while the weights
were still moving; after the data shifts (a new camera, a new domain) they
describe the wrong data altogether. Recalibration runs data through the
model and sets every layer's statistics to those of the data itself::

    running_mean = sum(x) / n                    over every value of a channel seen
    running_var  = sum((x - running_mean)^2) / (n - 1)     (unbiased, as PyTorch's)

**Exact, not an average of averages.** Each call of a layer contributes
its per-channel ``(count, mean, M2)`` (``M2`` the centred sum of squares)
in float64; the parts are merged with Chan et al.'s formula
(:func:`batchnorm.nn.sync.merge_stats`), weighted by their element counts,
so unequal batches (a short last batch) and spatial sizes count exactly as
much as the values they hold. Under ``torch.distributed`` every rank's
``(count, mean, M2)`` go out in one all-gather and every rank merges the
same rows in rank order: the statistics are identical on every rank.

**What the layers see.** As in training (and as Wu & Johnson's precise BN
and ``torch.optim.swa_utils.update_bn``), the BN layers normalize each batch
with its own statistics while the pass runs. The other modules run in
inference mode by default (``other_modules="eval"``): dropout is off, so the
statistics are those inference will see, which is the cure for dropout's
variance shift (Li et al., 2019).

**What is restored.** Every module's ``training`` flag; ``momentum`` is
never changed; ``num_batches_tracked`` keeps its value (it counts training
steps: ``momentum=None`` and :class:`~batchnorm.BatchRenorm2d`'s warm-up read
it, and recalibrating is not training). If anything raises, the running
statistics are put back as they were.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ..nn.sync import merge_stats
from ._common import display, require_batchnorm
from .freeze import frozen_batchnorm

__all__ = ["recalibrate_batchnorm"]

_OTHER_MODULES = ("eval", "train", "keep")


class _Statistics:
    """Per-call ``(count, mean, M2)`` of one layer's input, float64, merged at the end."""

    def __init__(self, module: nn.Module):
        self.axis = getattr(module, "axis", 1)
        self.counts: list[int] = []
        self.means: list[torch.Tensor] = []
        self.m2s: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args) -> None:  # forward pre-hook  # noqa: ARG002
        x = args[0].detach()
        axis = self.axis % x.dim()
        count = x.numel() // max(x.shape[axis], 1)
        if count == 0:
            return
        dims = [d for d in range(x.dim()) if d != axis]
        var, mean = torch.var_mean(x.to(torch.float64), dim=dims, correction=0)
        self.counts.append(count)
        self.means.append(mean)
        self.m2s.append(var * count)

    def merged(self, channels: int, device) -> tuple[int, torch.Tensor, torch.Tensor]:
        if not self.counts:
            zeros = torch.zeros(channels, dtype=torch.float64, device=device)
            return 0, zeros, zeros.clone()
        return merge_stats(torch.tensor(self.counts, dtype=torch.float64,
                                        device=self.means[0].device),
                           torch.stack(self.means), torch.stack(self.m2s))


def _to_device(x, device):
    return x.to(device) if device is not None and isinstance(x, torch.Tensor) else x


def _default_forward(model: nn.Module, batch, device):
    if isinstance(batch, torch.Tensor):
        return model(_to_device(batch, device))
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("recalibrate_batchnorm: the loader yielded an empty "
                             f"{type(batch).__name__}; its first element should be the input")
        return model(_to_device(batch[0], device))
    if isinstance(batch, Mapping):
        return model(**{k: _to_device(v, device) for k, v in batch.items()})
    raise TypeError(f"recalibrate_batchnorm: the loader yielded a {type(batch).__name__}; "
                    "expected a tensor, a tuple or list (the first element is the input) or "
                    "a dict (keyword arguments); pass forward=lambda model, batch: ... for "
                    "anything else")


def _model_device(model: nn.Module):
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def recalibrate_batchnorm(model: nn.Module, loader: Iterable, num_batches: int | None = None, *,
                          forward: Callable[[nn.Module, object], object] | None = None,
                          device: torch.device | str | None = None,
                          other_modules: str = "eval", process_group=None) -> nn.Module:
    """Recompute every BN layer's running statistics exactly, from ``loader``'s data.

    See :mod:`batchnorm.tools.recalibrate` for what is computed and kept.
    Recalibrated: every ``torch.nn.modules.batchnorm._BatchNorm`` with running
    statistics (PyTorch's, ours, SyncBatchNorm, renorm, the Keras-style
    layer along its ``axis``); not: layers frozen by
    :func:`~batchnorm.tools.freeze_batchnorm` (``stats=True``) and
    :class:`~batchnorm.FrozenBatchNorm` layers (their statistics are meant to
    stay), layers with ``track_running_stats=False``. A layer the data never
    reaches keeps its statistics, with a warning.

    Args:
        model: the model.
        loader: an iterable of batches (a ``DataLoader``, a list of tensors).
            A batch is a tensor (``model(batch)``), a tuple or list
            (``model(batch[0])``: ``(inputs, targets)`` pairs), or a dict
            (``model(**batch)``). Tensors are moved to ``device``.
        num_batches: use only the first this many batches. Default: ``None``
            (all).
        forward: ``forward(model, batch)`` runs one batch instead (for any
            other batch layout, or to move data yourself). Default: ``None``.
        device: where batches go. Default: the device of the model's first
            parameter or buffer.
        other_modules: mode of every module that is not a recalibrated BN
            layer while the data runs: ``"eval"`` (dropout off), ``"train"``
            (as ``torch.optim.swa_utils.update_bn``) or ``"keep"``.
            Default: ``"eval"``.
        process_group: under ``torch.distributed``, the ranks that pool their
            statistics (every rank of the group must call this function);
            ``None``: the world if a process group is initialized, else this
            process alone. Default: ``None``.

    Returns:
        ``model``, with new running statistics.

    Raises:
        ValueError: no BN layer to recalibrate; ``num_batches`` is not a
            positive int; the loader yielded no batch (on any rank); ranks
            hold different models.
        RuntimeError: another rank failed while recalibrating.

    Example:
        >>> import torch
        >>> from batchnorm.tools import recalibrate_batchnorm
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
        >>> data = [torch.tensor([[1.0, 10.0], [2.0, 20.0]]), torch.tensor([[3.0, 30.0]] * 2)]
        >>> recalibrate_batchnorm(net, data)[0].running_mean
        tensor([ 2.2500, 22.5000])
    """
    if isinstance(num_batches, bool) or not (num_batches is None or (
            isinstance(num_batches, int) and num_batches > 0)):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if other_modules not in _OTHER_MODULES:
        raise ValueError(f"other_modules must be one of {', '.join(map(repr, _OTHER_MODULES))}, "
                         f"got {other_modules!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    if isinstance(loader, (torch.Tensor, nn.Module)) or not isinstance(loader, Iterable):
        raise TypeError("recalibrate_batchnorm: loader must be an iterable of batches (a "
                        f"DataLoader, a list of tensors), got {type(loader).__name__}")
    frozen = frozen_batchnorm(model) if isinstance(model, nn.Module) else {}
    layers = []
    for name, m in require_batchnorm(model, "recalibrate_batchnorm"):
        if not isinstance(m, _BatchNorm) or frozen.get(name, {}).get("stats"):
            continue
        if m.running_mean is None or m.running_var is None:
            continue
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"recalibrate_batchnorm: {display(name)} is lazy and not "
                             "initialised yet (run one forward first)")
        layers.append((name, m))
    if not layers:
        raise ValueError("recalibrate_batchnorm: no batch-norm layer with running statistics "
                         "to recalibrate (all are frozen or have track_running_stats=False)")
    group = _group(process_group)
    device = torch.device(device) if device is not None else _model_device(model)
    run = forward or (lambda net, batch: _default_forward(net, batch, device))

    saved = [(m.running_mean.clone(), m.running_var.clone()) for _, m in layers]
    counters = [None if getattr(m, "num_batches_tracked", None) is None
                else m.num_batches_tracked.clone() for _, m in layers]
    modes = [(m, m.training) for m in model.modules()]
    targets = {id(m) for _, m in layers}
    stats = [_Statistics(m) for _, m in layers]
    hooks = [m.register_forward_pre_hook(s) for (_, m), s in zip(layers, stats, strict=True)]
    try:
        error = None
        seen = 0
        try:
            for m, _ in modes:
                if id(m) in targets:
                    m.training = True
                elif other_modules != "keep":
                    m.training = other_modules == "train"
            with torch.no_grad():
                for batch in itertools.islice(loader, num_batches):
                    run(model, batch)
                    seen += 1
        except Exception as err:  # the other ranks must still hear about it
            if group is None:
                raise
            error = err
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes:
                m.training = mode
        results = [s.merged(m.running_mean.numel(), m.running_mean.device)
                   for s, (_, m) in zip(stats, layers, strict=True)]
        if group is not None:
            results, seen = _pool(results, seen, layers, group, error)
        if seen == 0:
            raise ValueError("recalibrate_batchnorm: the loader yielded no batches"
                             + (" on any rank" if group is not None else ""))
    except BaseException:
        _restore(layers, saved, counters)
        raise
    _restore(layers, saved, counters)
    missed = []
    with torch.no_grad():
        for (name, m), (n, mean, m2) in zip(layers, results, strict=True):
            if n < 2:
                missed.append(display(name))
                continue
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_((m2 / (n - 1)).to(m.running_var.dtype))
    if missed:
        warnings.warn("recalibrate_batchnorm: the data never reached these batch-norm layers "
                      "(or one value per channel); their statistics are unchanged: "
                      + ", ".join(missed), stacklevel=2)
    return model


def _restore(layers, saved, counters):
    with torch.no_grad():
        for (_, m), (mean, var), count in zip(layers, saved, counters, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _group(process_group):
    """The process group to pool over, or ``None`` to stay local."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    return process_group if dist.get_world_size(process_group) > 1 else None


def _pool(results, seen, layers, group, error):
    """Every rank's ``(count, mean, M2)`` merged in rank order; the batches seen on all ranks.

    Two all-gathers: a header ``[failed, layers, channels, batches]`` (so a
    failure or a different model on one rank raises on all of them instead
    of breaking the second collective), then one float64 row
    ``[count, mean (C), M2 (C)]`` per layer, concatenated.
    """
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
        else torch.device("cpu")
    channels = sum(m.running_mean.numel() for _, m in layers)
    header = torch.tensor([float(error is not None), len(layers), channels, seen],
                          dtype=torch.float64, device=device)
    headers = _gather(header, group)
    failed = [r for r in range(len(headers)) if headers[r, 0] != 0]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"recalibrate_batchnorm: rank(s) {failed} of the process group "
                           "failed while running the data; the statistics are unchanged")
    if not torch.equal(headers[:, 1:3], headers[:1, 1:3].expand(len(headers), 2)):
        raise ValueError("recalibrate_batchnorm: the ranks hold different models ("
                         + ", ".join(f"rank {r}: {int(h[1])} layers, {int(h[2])} channels"
                                     for r, h in enumerate(headers.tolist())) + ")")
    row = torch.cat([torch.cat([torch.tensor([float(n)], dtype=torch.float64,
                                             device=mean.device), mean, m2]).to(device)
                     for n, mean, m2 in results])
    rows = _gather(row, group)
    pooled, start = [], 0
    for (_, m), (_, mean, _) in zip(layers, results, strict=True):
        c = m.running_mean.numel()
        part = rows[:, start:start + 1 + 2 * c]
        n, mean_all, m2_all = merge_stats(part[:, 0], part[:, 1:1 + c], part[:, 1 + c:])
        pooled.append((n, mean_all.to(mean.device), m2_all.to(mean.device)))
        start += 1 + 2 * c
    return pooled, int(headers[:, 3].sum().item())


def _gather(row: torch.Tensor, group) -> torch.Tensor:
    rows = torch.empty(dist.get_world_size(group), row.numel(), dtype=row.dtype,
                       device=row.device)
    try:
        dist.all_gather(list(rows.unbind(0)), row, group=group)
    except RuntimeError as error:
        raise RuntimeError(f"recalibrate_batchnorm: a collective failed on global rank "
                           f"{dist.get_rank()}: {error}. Every rank of the process group must "
                           "call recalibrate_batchnorm with the same model") from error
    return rows
