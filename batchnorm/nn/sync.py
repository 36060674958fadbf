"""``SyncBatchNorm``: the statistics of the global batch, over ``torch.distributed``.

**Forward, one collective.** Each rank computes the ``(count, mean, M2)`` of
its own batch with our kernels (``M2 = count * var``, the centred sum of
squares) and all-gathers one float64 row ``[C, count, mean (C), M2 (C)]``.
Every rank then merges the same gathered rows in the same order
(:func:`merge_stats`, Chan et al.'s parallel formula), so every rank holds
bit-identical global statistics; unequal and empty batches weigh by their
counts. The output is normalized locally with the fused residual and
activation.

**Backward, one collective.** Each rank sums ``g`` and ``g * (x - mean)``
over its batch (centred on the *global* mean, so the sums add up exactly),
all-reduces the float64 ``[sum_g (C), sum_gxc (C)]``, and computes its
``grad_input`` from the global sums. ``grad_weight`` and ``grad_bias`` stay
per rank, as with PyTorch's SyncBatchNorm: DDP (or an all-reduce) sums them.

**Errors, never a hang.** The first training call of a layer on a process
group also all-gathers ``num_features`` (one number), so ranks built with
different channel counts raise a clear ``ValueError`` on every rank instead
of crashing the collective (gloo aborts the process on a size mismatch). A
rank whose input fails validation still sends its row, flagged, then raises;
the others raise too. A collective that fails or times out (the process
group's ``timeout=``) is re-raised as a ``RuntimeError`` naming SyncBatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .._backend import resolve_backend
from ..functional import _check_finite, _validate
from ..kernels import torch_ops
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _OursMixin

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "merge_stats", "revert_sync_batchnorm"]


def merge_stats(counts, means, m2s):
    """Merge per-part ``(count, mean, M2)`` into the statistics of the whole.

    Chan, Golub & LeVeque's parallel formula for ``k`` parts, in one step:
    ``mean = sum(n_i * mean_i) / n`` and
    ``M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)``. Only centred terms are
    added, so nothing cancels (unlike ``sum(x^2) - n * mean^2``); parts with
    ``n_i = 0`` contribute nothing.

    Args:
        counts: ``(k,)`` elements per channel in each part.
        means, m2s: ``(k, C)`` per-part means and centred sums of squares.

    Returns:
        ``(n, mean, M2)``: the total count (a Python ``int``) and ``(C,)``
        tensors (zeros when ``n == 0``).

    Example:
        >>> import torch
        >>> x = torch.randn(7, 3, dtype=torch.float64)
        >>> parts = [x[:2], x[2:2], x[2:]]
        >>> n, mean, m2 = merge_stats(
        ...     torch.tensor([float(len(p)) for p in parts], dtype=torch.float64),
        ...     torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64)
        ...                  for p in parts]),
        ...     torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else
        ...                  torch.zeros(3, dtype=torch.float64) for p in parts]))
        >>> n, torch.allclose(mean, x.mean(0)), torch.allclose(m2 / n, x.var(0, correction=0))
        (7, True, True)
    """
    n = int(counts.sum().item())
    if n == 0:
        return 0, torch.zeros_like(means[0]), torch.zeros_like(m2s[0])
    w = (counts / n).unsqueeze(1)                                 # (k, 1)
    mean = (w * means).sum(0)                                     # (C,)
    spread = counts.unsqueeze(1) * (means - mean).square()        # (k, C)
    return n, mean, m2s.sum(0) + spread.sum(0)


class SyncBatchNorm(_OursMixin, _BatchNorm):
    r"""Batch Normalization over the global batch of a ``torch.distributed`` group.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    where the mean and variance are taken over the batches of *every* rank of
    ``process_group`` together, as if one process ran the concatenated batch
    (unequal and empty per-rank batches included). Any input rank >= 2, as
    PyTorch's SyncBatchNorm; it runs on the CPU with gloo as well as on GPUs
    with NCCL.

    **Training** with an initialised process group of two or more ranks: one
    all-gather of per-rank ``(count, mean, M2)`` in the forward, one
    all-reduce of the per-channel gradient sums in the backward (see
    :mod:`batchnorm.nn.sync`); every rank updates ``running_mean`` and
    ``running_var`` identically. **Inference** (``model.eval()``), a world of
    one, or no initialised process group: plain batch norm, no communication.

    The variance used to normalize is the biased one over the global batch;
    ``running_var`` is updated with the unbiased one (divided by ``n - 1``,
    ``n`` values per channel over all ranks). The update rule is
    ``running = (1 - momentum) * running + momentum * batch``; with
    ``momentum=None`` it is a cumulative average.

    Parameters, buffers and ``state_dict`` are those of
    ``torch.nn.SyncBatchNorm``, but the class subclasses ``_BatchNorm``, not
    ``torch.nn.SyncBatchNorm``: DDP refuses the latter on the CPU. Every rank
    of the group must run the layer's forward and backward in the same order
    (and agree on whether the input needs a gradient). Double backward
    (``create_graph=True``) is not supported.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance for numerical stability. Default: ``1e-5``.
        momentum: weight of the new batch in the running statistics, or
            ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep running statistics for inference.
            Default: ``True``.
        process_group: the group whose ranks share statistics; ``None`` is
            the default (world) group. Default: ``None``.
        bias: with ``affine``, whether to learn ``bias``. Default: ``True``.
        activation: fused activation after normalization (and the residual
            add), as in :class:`batchnorm.BatchNorm2d`. Default: ``None``.
        negative_slope: slope of ``"leaky_relu"``. Default: ``0.01``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``; a backend
            without the two-stage backward runs the portable path when synced.
            Default: ``"auto"``.
        check_finite: raise (on every rank) instead of letting NaN/Inf reach
            the running statistics. Default: ``False``.

    Shape:
        - Input: :math:`(N, C, *)`; ``N`` may differ between ranks, and be 0
        - Residual (``forward(x, residual)``): same as input
        - Output: same shape, dtype and memory format as input

    Raises:
        ValueError: ranks with different ``num_features``; one value per
            channel over the global batch in training.
        RuntimeError: a collective failed or timed out; another rank's input
            failed validation; this process is not in ``process_group``.

    Example:
        >>> import torch
        >>> import batchnorm
        >>> m = batchnorm.SyncBatchNorm(3, activation="relu")
        >>> m(torch.randn(4, 3, 5, 5)).shape  # no process group: plain batch norm
        torch.Size([4, 3, 5, 5])
    """

    _revert_to = None  # the class convert_sync_batchnorm replaced, by name

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True, activation=None, negative_slope=0.01, backend="auto",
                 check_finite=False):
        _BatchNorm.__init__(self, num_features, eps=eps, momentum=momentum, affine=affine,
                            track_running_stats=track_running_stats, device=device, dtype=dtype)
        self._init_ours(bias, activation, negative_slope, backend, check_finite)
        self.process_group = process_group
        self._sync_checked = None

    def __getstate__(self):
        # A copy, or a module loaded elsewhere, checks num_features again.
        state = super().__getstate__()
        state["_sync_checked"] = None
        return state

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Same as :func:`convert_sync_batchnorm` (PyTorch's spelling)."""
        return convert_sync_batchnorm(module, process_group)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        group = self._sync_group()
        if group is None:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return self._batch_norm(input, residual)
        return self._sync_batch_norm(input, residual, group)

    def _sync_group(self):
        """The group to share statistics with, or ``None`` for plain batch norm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_rank(group) < 0:
            raise RuntimeError(
                f"SyncBatchNorm: this process (global rank {dist.get_rank()}) is not a member "
                "of the layer's process_group; give each rank a group it belongs to")
        return group if dist.get_world_size(group) > 1 else None

    def _momentum(self, track):
        if track and self.momentum is None:
            return 1.0 / (float(self.num_batches_tracked) + 1.0)
        return 0.0 if self.momentum is None else self.momentum

    def _local_error(self, input, residual, momentum):
        """The exception this rank's input raises, or ``None``; never raised here,
        so that the rank still joins the collective and the others learn of it."""
        try:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            # The one-value-per-channel rule applies to the global batch (checked
            # after the exchange): a rank may hold a single sample.
            probe, probe_residual = input, residual
            if input.numel() == input.shape[1]:
                shape = (2, *input.shape[1:])
                probe = input.expand(shape)
                if isinstance(residual, torch.Tensor) and residual.shape == input.shape:
                    probe_residual = residual.expand(shape)
            track = self.track_running_stats
            _validate(probe, self.running_mean if track else None,
                      self.running_var if track else None, self.weight, self.bias, True,
                      momentum, self.eps, self.activation, self.negative_slope, probe_residual)
            if input.shape[1] != self.num_features:
                raise ValueError(f"SyncBatchNorm({self.num_features}) got an input with "
                                 f"{input.shape[1]} channels, shape {tuple(input.shape)}")
            resolve_backend(self.backend, input)
        except Exception as error:  # noqa: BLE001 - any local failure is shared
            return error
        return None

    def _sync_batch_norm(self, input, residual, group):
        track = self.track_running_stats and self.num_batches_tracked is not None
        momentum = self._momentum(track)
        error = self._local_error(input, residual, momentum)
        C = self.num_features
        device = input.device if isinstance(input, torch.Tensor) else next(
            (t.device for t in (*self.parameters(), *self.buffers())), torch.device("cpu"))
        world = dist.get_world_size(group)
        key = (id(group), world)
        if self._sync_checked != key:
            sizes = _all_gather(torch.tensor([float(C)], dtype=torch.float64, device=device),
                                group, "checking num_features")[:, 0].long().tolist()
            if len(set(sizes)) > 1:
                raise ValueError(
                    "SyncBatchNorm: the ranks of the process group disagree on num_features "
                    f"(group rank -> num_features: {dict(enumerate(sizes))}); every rank must "
                    "build the same layer")
            self._sync_checked = key
        ops = None
        row = torch.zeros(2 + 2 * C, dtype=torch.float64, device=device)
        row[0], row[1] = C, -1  # count -1: this rank failed
        if error is None:
            ops = resolve_backend(self.backend, input)
            if not hasattr(ops, "backward_reduce"):
                ops = torch_ops  # the backend has no two-stage backward
            count = input.numel() // C
            row[1] = count
            if count:
                with torch.no_grad():
                    mean, var = ops.batch_stats(input.detach())
                row[2:2 + C] = mean
                row[2 + C:] = var.double() * count
        rows = _all_gather(row, group, "exchanging batch statistics")
        if error is not None:
            raise error
        failed = (rows[:, 1] < 0).nonzero().flatten().tolist()
        if failed:
            raise RuntimeError(
                f"SyncBatchNorm: the input of group rank(s) {failed} failed validation (see the "
                "error on those ranks); nothing was computed or updated on any rank")
        n, mean, m2 = merge_stats(rows[:, 1], rows[:, 2:2 + C], rows[:, 2 + C:])
        if n == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                f"over the {world} ranks of the process group (input size {input.size()} "
                "on this rank)")
        cdtype = torch_ops.compute_dtype(input.dtype)
        var = (m2 / n).to(cdtype) if n else torch.ones(C, dtype=cdtype, device=device)
        invstd = torch.rsqrt(var + self.eps)
        out = _SyncBatchNormFunction.apply(input, self.weight, self.bias, residual, mean, invstd,
                                           n, self.activation, self.negative_slope, ops, group)
        if self.check_finite and n:
            _check_finite(mean, var)
        if track:
            if n:
                ops.update_running_stats(self.running_mean, self.running_var, mean, var, n,
                                         momentum)
            self.num_batches_tracked.add_(1)
        return out


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with given global statistics; the backward sums over the group."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, mean, invstd, count, activation,
                negative_slope, ops, group):
        out, act_saved = ops.normalize(input, mean, invstd, weight, bias, residual, activation,
                                       negative_slope)
        ctx.save_for_backward(input, weight, bias, mean, invstd, act_saved)
        ctx.count, ctx.activation, ctx.negative_slope = count, activation, negative_slope
        ctx.ops, ctx.group = ops, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("SyncBatchNorm does not support double backward "
                               "(create_graph=True)")
        x, weight, bias, mean, invstd, act_saved = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        act, slope, ops = ctx.activation, ctx.negative_slope, ctx.ops
        sum_g, sum_gxc, g = ops.backward_reduce(grad_out, x, mean, act_saved, act, slope,
                                                need_gxc=need_x or need_w, keep_g=need_r)
        grad_input = None
        if need_x:
            sums = torch.cat([sum_g, sum_gxc]).double()
            _all_reduce(sums, ctx.group, "summing gradients")
            C = sum_g.numel()
            total_g, total_gxc = sums[:C].to(invstd.dtype), sums[C:].to(invstd.dtype)
            grad_input = ops.backward_elementwise(grad_out, x, mean, invstd, weight, total_g,
                                                  total_gxc, ctx.count, act_saved, act, slope,
                                                  True, g)
        grad_weight = (sum_gxc * invstd).to(weight.dtype) if need_w else None
        grad_bias = sum_g.to(bias.dtype) if need_b else None
        return grad_input, grad_weight, grad_bias, g if need_r else None, *([None] * 7)


def _comm_error(what, group, error):
    return RuntimeError(
        f"SyncBatchNorm: the collective {what} failed on global rank {dist.get_rank()} "
        f"({dist.get_world_size(group)} ranks in the process group): {error}. Every rank of "
        "the group must run this layer's forward and backward in the same order; a rank "
        "that died, did not arrive within the process group's timeout, or ran a different "
        "model causes this.")


def _all_gather(row, group, what):
    """``(world, len(row))``: every rank's row, in group-rank order."""
    rows = torch.empty(dist.get_world_size(group), row.numel(), dtype=row.dtype,
                       device=row.device)
    try:
        dist.all_gather(list(rows.unbind(0)), row, group=group)
    except RuntimeError as error:
        raise _comm_error(what, group, error) from error
    return rows


def _all_reduce(tensor, group, what):
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as error:
        raise _comm_error(what, group, error) from error


# Exact types whose forward SyncBatchNorm reproduces; subclasses may do more.
_REVERT_NAMES = {nn.BatchNorm1d: "BatchNorm1d", nn.BatchNorm2d: "BatchNorm2d",
                 nn.BatchNorm3d: "BatchNorm3d", BatchNorm1d: "BatchNorm1d",
                 BatchNorm2d: "BatchNorm2d", BatchNorm3d: "BatchNorm3d", BatchNorm: None}
_SYNC_TYPES = (SyncBatchNorm, nn.SyncBatchNorm)
_OURS = {"BatchNorm1d": BatchNorm1d, "BatchNorm2d": BatchNorm2d, "BatchNorm3d": BatchNorm3d,
         None: BatchNorm}


def _why_not(m, known) -> str | None:
    """Why ``m`` (a ``_BatchNorm``) is left alone, or ``None`` if it is converted."""
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        return "is lazy and not initialised yet (run one forward first)"
    if type(m) not in known:
        return (f"is a {type(m).__module__}.{type(m).__qualname__}, a subclass whose "
                "behaviour the conversion cannot keep")
    if getattr(m, "virtual_batch_size", None) is not None:
        return "uses ghost batches (virtual_batch_size), which are per process"
    return None


def _swap(module, kind, known, make, unknown):
    """Replace every layer of type ``kind`` that :func:`_why_not` accepts by ``make(m)``."""
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    problems = [f"{name or '<root>'} {reason}" for name, m in module.named_modules()
                if isinstance(m, kind) and (reason := _why_not(m, known))]
    if problems and unknown == "error":
        raise TypeError("cannot convert these batch-norm layers (pass unknown='skip' to leave "
                        "them as they are): " + "; ".join(problems))
    memo = {}

    def visit(m):
        if isinstance(m, kind) and _why_not(m, known) is None:
            if id(m) not in memo:  # a layer shared by two parents stays shared
                memo[id(m)] = make(m)
            return memo[id(m)]
        for name, child in m.named_children():
            m._modules[name] = visit(child)
        return m

    return visit(module)


def _move_state(src, dst):
    """``dst`` takes ``src``'s very parameters and buffers (identity, ``requires_grad``,
    device, dtype and optimizer references kept), training flag and our options."""
    dst._parameters.clear()
    dst._parameters.update(src._parameters)
    dst._buffers.clear()
    dst._buffers.update(src._buffers)
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    dst.training = src.training
    if isinstance(src, _OursMixin):
        for name in ("activation", "negative_slope", "backend", "check_finite"):
            setattr(dst, name, getattr(src, name))
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def convert_sync_batchnorm(module, process_group=None, *, unknown="error"):
    """Every batch-norm layer of ``module`` as a :class:`SyncBatchNorm`.

    Converts ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``, our
    ``BatchNorm1d/2d/3d``, ``BatchNorm`` and ``SyncBatchNorm`` (exact types).
    The new layer takes the old one's very ``Parameter`` and buffer objects
    (so ``requires_grad``, device, dtype and an optimizer's references are
    kept), its training flag, ``eps``, ``momentum``, and our ``activation``,
    ``negative_slope``, ``backend`` and ``check_finite``; it records the class
    it replaced for :func:`revert_sync_batchnorm`. Hooks are not carried over.

    Other ``_BatchNorm`` subclasses (a user's own, our Keras-style
    ``BatchNormalization``), lazy layers not initialised yet and ghost-batch
    layers are *not* converted silently: by default a ``TypeError`` names
    them all, before anything changes; ``unknown="skip"`` leaves them as they
    are (each still normalizes per process).

    Args:
        module: the model, or a single layer.
        process_group: the group to share statistics with; ``None`` is the
            world. Default: ``None``.
        unknown: ``"error"`` or ``"skip"``. Default: ``"error"``.

    Returns:
        ``module``, changed in place, or the new layer if ``module`` itself is one.

    Example:
        >>> import torch
        >>> import batchnorm
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> net = batchnorm.convert_sync_batchnorm(net)
        >>> type(net[1]).__name__
        'SyncBatchNorm'
    """
    known = set(_REVERT_NAMES) | set(_SYNC_TYPES)

    def make(m):
        new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                            process_group, device="meta", bias=m.bias is not None)
        new._revert_to = _REVERT_NAMES.get(type(m), getattr(m, "_revert_to", None))
        return _move_state(m, new)

    return _swap(module, _BatchNorm, known, make, unknown)


def revert_sync_batchnorm(module, *, unknown="error"):
    """Every ``SyncBatchNorm`` of ``module`` (ours or PyTorch's) back to plain batch norm.

    A layer made by :func:`convert_sync_batchnorm` goes back to our class of
    the layer it replaced (``BatchNorm1d/2d/3d``); any other (built directly,
    or PyTorch's, which does not know the input rank) becomes our rank-agnostic
    :class:`batchnorm.BatchNorm` with the same ``num_features``. Parameters,
    buffers, flags and options are kept as in :func:`convert_sync_batchnorm`;
    subclasses follow ``unknown`` there too.

    Example:
        >>> import torch
        >>> import batchnorm
        >>> net = batchnorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
        >>> type(batchnorm.revert_sync_batchnorm(net)[0]).__name__
        'BatchNorm1d'
    """
    def make(m):
        cls = _OURS[getattr(m, "_revert_to", None)]
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                  device="meta", bias=m.bias is not None)
        return _move_state(m, new)

    return _swap(module, _SYNC_TYPES, set(_SYNC_TYPES), make, unknown)
