r"""Ghost (virtual) batches: batch norm with statistics per slice of the batch.

Hoffer, Hubara & Soudry (2017), "Train longer, generalize better: closing the
generalization gap in large batch training of neural networks", Algorithm 1
("Ghost Batch Normalization"); Keras 2's ``virtual_batch_size``.

**Training**: the real batch of ``N`` samples is split into consecutive ghost
batches of ``virtual_batch_size`` (``V``) samples, ``x[0:V]``, ``x[V:2V]``, ...,
and each is normalized with its own mean and biased variance, exactly as
:func:`batchnorm.functional.batch_norm` would normalize it alone. Large-batch
training then sees the statistical noise of small batches (the paper's
regularizer) while the hardware still runs one large batch.

**The remainder rule.** When ``V`` does not divide ``N``, the last
``r = N % V`` samples form a smaller ghost batch with its own statistics; if
that batch would hold a single value per channel (``r == 1`` and no spatial
extent), where a variance is undefined, it joins the previous ghost batch
instead (which then has ``V + 1`` samples). :func:`ghost_batch_sizes` spells
the rule out. ``V > N`` is an error (the batch is smaller than one ghost
batch), and so is ``V`` samples holding one value per channel (``V == 1``
for ``(N, C)`` input). An empty batch behaves as plain batch norm does.

**Running statistics** are updated once per real batch, momentum applied
once, with the size-weighted average of the ghost batches' means (which is the
mean of the whole batch) and of their *unbiased* variances. This is Keras 2's
rule (the plain average over its equal-sized ghost batches) in PyTorch's
unbiased convention. The paper applies the momentum once per ghost batch in
sequence; Keras's comment on that choice holds here too: the running
statistics only serve inference, and one update is cheaper. Averaging
unbiased within-ghost variances estimates the population variance without
bias, where the variance of the whole batch would not match the statistics
the layer normalized with in training.

**Inference** (``training=False``) is plain batch norm: ghost batches only
exist in training.

Differences from Keras 2, which reshapes ``(N, ...)`` to ``(V, N // V, ...)``:
its ghost batch ``g`` is the strided set of samples ``g, g + N/V, g + 2N/V,
...``, here it is the consecutive slice ``x[g*V:(g+1)*V]`` (the paper's split,
and what PyTorch's ``chunk``-based implementations do); Keras requires
``N % V == 0``.

**How it is computed** (no Python loop over ghost batches): the ``G = N // V``
full ghost batches are viewed as ``(G, V, C, *)`` and regrouped to
``(V, G * C, *)``, so each (ghost batch, channel) pair is one channel of
:func:`batchnorm.functional.batch_norm`, with ``weight`` and ``bias`` repeated
``G`` times (autograd sums their gradients back). A remainder ghost batch is
one more call. The regrouping costs one copy of the input (and of the
residual) in and one of the output back, laid out so that contiguous input
stays contiguous and ``channels_last`` stays ``channels_last``.
"""

from __future__ import annotations

import torch

from ..functional import _validate, batch_norm

__all__ = ["ghost_batch_norm", "ghost_batch_sizes"]


def check_virtual_batch_size(virtual_batch_size) -> None:
    """Raise unless ``virtual_batch_size`` is ``None`` or a positive ``int``."""
    if virtual_batch_size is None:
        return
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise TypeError("virtual_batch_size must be a positive int or None, got "
                        f"{virtual_batch_size!r}")
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be at least 1, got {virtual_batch_size}")


def ghost_batch_sizes(batch_size: int, virtual_batch_size: int,
                      values_per_sample: int = 1) -> list[int]:
    """The sizes of the ghost batches a training batch is split into, in order.

    Args:
        batch_size: ``N``, samples in the real batch (at least 1).
        virtual_batch_size: ``V``, samples per ghost batch.
        values_per_sample: values per channel in one sample (the product of
            the spatial sizes; 1 for ``(N, C)`` input). Default: ``1``.

    Returns:
        ``N // V`` sizes of ``V``, then the remainder ``N % V`` if there is one
        and it holds more than one value per channel; a remainder of one value
        per channel is added to the last full ghost batch instead.

    Raises:
        ValueError: ``V > N``, or a ghost batch of ``V`` samples would hold a
            single value per channel.

    Example:
        >>> from batchnorm.nn.ghost import ghost_batch_sizes
        >>> ghost_batch_sizes(10, 4), ghost_batch_sizes(9, 4), ghost_batch_sizes(9, 4, 16)
        ([4, 4, 2], [4, 5], [4, 4, 1])
    """
    check_virtual_batch_size(virtual_batch_size)
    if virtual_batch_size is None:
        raise TypeError("virtual_batch_size must be a positive int, got None")
    N, V, L = batch_size, virtual_batch_size, values_per_sample
    if V > N:
        raise ValueError(
            f"virtual_batch_size={V} does not fit in a batch of {N} sample(s): a ghost batch "
            "cannot be larger than the batch (use a smaller virtual_batch_size, or drop "
            "the smaller last batch of an epoch)")
    if V * L < 2:
        raise ValueError(
            f"virtual_batch_size={V} gives ghost batches with 1 value per channel "
            f"({V} sample(s) x {L} value(s) each), whose variance is undefined; use "
            "virtual_batch_size >= 2")
    G, r = divmod(N, V)
    sizes = [V] * G
    if r * L >= 2:
        sizes.append(r)
    elif r:
        sizes[-1] += r
    return sizes


def ghost_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5, *, virtual_batch_size, activation=None,
                     negative_slope=0.01, residual=None, backend="auto", check_finite=False):
    """:func:`batchnorm.functional.batch_norm` with ghost batches in training.

    Same arguments and result as :func:`~batchnorm.functional.batch_norm`,
    plus ``virtual_batch_size``. With ``training=False`` or
    ``virtual_batch_size=None`` it *is* that function. In training, each ghost
    batch (see :func:`ghost_batch_sizes`) is normalized with its own
    statistics, and ``running_mean``/``running_var`` (if given) are updated
    once, in place, with the size-weighted average of the ghost batches'
    means and unbiased variances. Everything is checked before anything is
    computed; a call that raises changes no running statistic.

    Raises:
        ValueError: ``virtual_batch_size`` larger than the batch or giving one
            value per channel per ghost batch, and every error of
            :func:`~batchnorm.functional.batch_norm`.
        TypeError: ``virtual_batch_size`` is not an ``int``.

    Example:
        >>> import torch
        >>> from batchnorm.nn.ghost import ghost_batch_norm
        >>> x = torch.randn(8, 3)
        >>> y = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4)
        >>> torch.allclose(y[:4].mean(0), torch.zeros(3), atol=1e-6)
        True
    """
    check_virtual_batch_size(virtual_batch_size)
    plain = dict(activation=activation, negative_slope=negative_slope, residual=residual,
                 backend=backend, check_finite=check_finite)
    if not training or virtual_batch_size is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, **plain)
    _validate(input, running_mean, running_var, weight, bias, True, momentum, eps, activation,
              negative_slope, residual)
    if input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps,
                          **plain)
    N, C = input.shape[:2]
    L = input[0, 0].numel()
    sizes = ghost_batch_sizes(N, virtual_batch_size, L)
    if len(sizes) == 1:  # one ghost batch: the whole batch, plain batch norm
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps,
                          **plain)
    V = virtual_batch_size
    G = len(sizes) if sizes[-1] == V else len(sizes) - 1  # full ghost batches, one call
    track = running_mean is not None
    sdtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    M = G * V
    # split (not slicing) so the input's gradient is assembled by one cat, which
    # keeps the memory format.
    xs = (input,) if M == N else input.split([M, N - M])
    rs = (residual,) * len(xs) if residual is None or M == N else residual.split([M, N - M])
    parts, stats = [], []
    kw = dict(activation=activation, negative_slope=negative_slope, backend=backend,
              check_finite=check_finite)
    if G:
        rm = torch.zeros(G * C, dtype=sdtype, device=input.device) if track else None
        rv = torch.zeros(G * C, dtype=sdtype, device=input.device) if track else None
        res = None if residual is None else _ghosts_as_channels(rs[0], G, V)
        # momentum=1 leaves each ghost batch's mean and unbiased variance in rm, rv.
        y = batch_norm(_ghosts_as_channels(xs[0], G, V), rm, rv, _repeat(weight, G),
                       _repeat(bias, G), True, 1.0, eps, residual=res, **kw)
        parts.append(_channels_as_ghosts(y, G, V, input))
        if track:
            stats.append((rm.view(G, C), rv.view(G, C), V))
    if M < N:
        rm = torch.zeros(C, dtype=sdtype, device=input.device) if track else None
        rv = torch.zeros(C, dtype=sdtype, device=input.device) if track else None
        parts.append(batch_norm(xs[-1], rm, rv, weight, bias, True, 1.0, eps, residual=rs[-1],
                                **kw))
        if track:
            stats.append((rm.view(1, C), rv.view(1, C), N - M))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    if track:
        _update_running_stats(running_mean, running_var, stats, momentum)
    return out


def _update_running_stats(running_mean, running_var, stats, momentum):
    """One momentum step with the size-weighted average of the ghost statistics."""
    with torch.no_grad():
        means = torch.cat([m for m, _, _ in stats])                                # (K, C)
        variances = torch.cat([v for _, v, _ in stats])                            # (K, C)
        sizes = [n for m, _, n in stats for _ in range(m.shape[0])]
        w = torch.tensor(sizes, dtype=means.dtype, device=means.device) / sum(sizes)  # (K,)
        mean = (w[:, None] * means).sum(0)                                         # (C,)
        var = (w[:, None] * variances).sum(0)                                      # (C,)
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


def _repeat(v, G):
    return None if v is None else v.repeat(G)


def _memory_order(t: torch.Tensor) -> list[int]:
    """The non-batch axes of ``t`` from outermost to innermost in memory."""
    return sorted(range(1, t.dim()), key=lambda d: -t.stride(d))


def _regroup_to_channels(t: torch.Tensor, G: int, V: int) -> torch.Tensor:
    """``(G*V, C, *S)`` -> ``(V, G*C, *S)``: channel ``g*C + c`` is channel ``c`` of ghost ``g``.

    One copy; ``(g, c)`` take the place of ``c`` in ``t``'s memory order, so a
    contiguous input gives a contiguous result and ``channels_last`` gives
    ``channels_last``.
    """
    C, S = t.shape[1], t.shape[2:]
    t5 = t.reshape(G, V, C, *S)                  # axes: G=0, V=1, C=2, S=3..
    phys = [1]
    for d in _memory_order(t):
        phys += [0, 2] if d == 1 else [d + 1]
    p = t5.permute(phys).contiguous()
    logical = [1, 0, 2, *range(3, t5.dim())]     # (V, G, C, *S)
    return p.permute([phys.index(a) for a in logical]).view(V, G * C, *S)


def _regroup_to_batch(y: torch.Tensor, G: int, V: int, C: int, order: list[int]) -> torch.Tensor:
    """Inverse of :func:`_regroup_to_channels`; the non-batch axes laid out in ``order``."""
    S = y.shape[2:]
    y5 = y.reshape(V, G, C, *S)                  # axes: V=0, G=1, C=2, S=3..
    phys = [1, 0] + [2 if d == 1 else d + 1 for d in order]
    p = y5.permute(phys).contiguous()
    logical = [1, 0, 2, *range(3, y5.dim())]     # (G, V, C, *S)
    return p.permute([phys.index(a) for a in logical]).view(G * V, C, *S)


class _ToChannels(torch.autograd.Function):
    """:func:`_regroup_to_channels` whose gradient comes back in the input's memory format.

    (Autograd's own backward of the copy would lay the gradient out like the
    regrouped tensor, and a final reshape would then make it contiguous.)
    """

    @staticmethod
    def forward(ctx, t, G, V):
        ctx.G, ctx.V, ctx.order = G, V, _memory_order(t)
        return _regroup_to_channels(t, G, V)

    @staticmethod
    def backward(ctx, grad):
        return _ToBatch.apply(grad, ctx.G, ctx.V, ctx.order), None, None


class _ToBatch(torch.autograd.Function):
    """:func:`_regroup_to_batch` as an autograd op (its backward is :class:`_ToChannels`)."""

    @staticmethod
    def forward(ctx, y, G, V, order):
        ctx.G, ctx.V = G, V
        return _regroup_to_batch(y, G, V, y.shape[1] // G, order)

    @staticmethod
    def backward(ctx, grad):
        return _ToChannels.apply(grad, ctx.G, ctx.V), None, None, None


def _ghosts_as_channels(t, G, V):
    return _ToChannels.apply(t, G, V)


def _channels_as_ghosts(y, G, V, like):
    return _ToBatch.apply(y, G, V, _memory_order(like))
