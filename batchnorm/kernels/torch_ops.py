"""The portable backend: batch norm composed of plain tensor primitives.

Runs wherever PyTorch runs (any device, any dtype PyTorch supports) and never
calls PyTorch's batch-norm ops. Every backend exposes the same functions,
so :mod:`batchnorm.functional` can swap them:

* ``forward(x, running_mean, running_var, weight, bias, residual, training,
  eps, activation, negative_slope) -> (out, act_saved, mean, var, invstd)``:
  the whole forward, which a backend may fuse (this one composes the next two);
* ``batch_stats(x) -> (mean, var)``: per-channel mean and biased variance;
* ``normalize(x, mean, invstd, weight, bias, residual, activation, negative_slope)
  -> (out, act_saved)``: the apply pass with the fused epilogue;
* ``backward(grad_out, x, mean, invstd, weight, act_saved, activation,
  negative_slope, training, needs_input_grad) -> (grad_input, grad_weight,
  grad_bias, grad_residual)``, the composition of its two passes, also exposed
  for :class:`batchnorm.nn.SyncBatchNorm` (which adds the sums up over
  processes in between): ``backward_reduce(...) -> (sum_g, sum_gxc, g)`` and
  ``backward_elementwise(..., sum_g, sum_gxc, count, ...) -> grad_input``;
* ``update_running_stats(running_mean, running_var, mean, var, count, momentum)``,
  in place on the device (no host synchronisation).

Tensors are ``(N, C, *)`` with any strides (contiguous, channels_last, or a
permuted view); per-channel values are ``(C,)`` in the compute dtype (float64
for float64 input, float32 otherwise), except ``mean``, which may carry extra
precision as float64 (see :func:`batch_stats`).

**Memory traffic.** On the CPU a fresh large tensor (page faults) and a trip
through main memory cost more than the arithmetic, so large inputs are walked
in cache-sized blocks (:data:`BLOCK` elements, :func:`_blocks`): each block is
read from memory once and every following step of the pass (centring,
squaring, the sums, the affine map, the activation, float32 upcasts of
bfloat16/float16) runs on data still in cache, in one scratch buffer the size
of a block. The only full-size allocations are the ones the caller gets back
(the output, ``grad_input``), as with PyTorch's own kernels. Off the CPU the
whole tensor is one block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Activations whose derivative can be read off the output; the rest keep the
# pre-activation (an extra tensor) for the backward.
_GRAD_FROM_OUTPUT = {None, "relu", "sigmoid", "tanh"}

# Elements per cache block on the CPU: a block of float32 input plus its
# float32 scratch (8 MiB) stays in a 32 MiB L3 while the few ops of a pass run
# over it. Smaller blocks pay PyTorch's per-op overhead (and a thread-pool
# fork/join per op) too often; larger ones spill to memory.
BLOCK = 1 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every axis but the channel axis 1."""
    return [0, *range(2, x.dim())]


def channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(C,)`` -> ``(1, C, 1, ..., 1)`` for broadcasting against an ``ndim`` input."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == compute_dtype(x.dtype) else x.to(compute_dtype(x.dtype))


def saves_output(activation: str | None, negative_slope: float) -> bool:
    """Whether the activation's derivative can be computed from its output."""
    return activation in _GRAD_FROM_OUTPUT or (activation == "leaky_relu" and negative_slope > 0)


def _blocks(x: torch.Tensor) -> list[tuple[slice, ...]]:
    """Index tuples that tile ``x`` into blocks of at most about :data:`BLOCK` elements.

    Whole samples (dim 0) when they fit, else one sample split along dim 2.
    A single block (the whole tensor) off the CPU and for small inputs.
    """
    if x.device.type != "cpu" or x.numel() <= BLOCK:
        return [(slice(None),)]
    N = x.shape[0]
    per_sample = x.numel() // N
    if per_sample <= BLOCK or x.dim() < 3 or x.shape[2] < 2:
        rows = max(1, BLOCK // per_sample)
        return [(slice(i, min(i + rows, N)),) for i in range(0, N, rows)]
    H = x.shape[2]
    step = max(1, BLOCK // (per_sample // H))
    return [(slice(n, n + 1), slice(None), slice(h, min(h + step, H)))
            for n in range(N) for h in range(0, H, step)]


def _scratch(x: torch.Tensor, blocks, dtype: torch.dtype) -> torch.Tensor:
    """A buffer shaped and laid out like the first (largest) block of ``x``."""
    return torch.empty_like(x[blocks[0]], dtype=dtype)


def _fit(buf: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``buf`` cut down to a (last, smaller) block's shape."""
    return buf if buf.shape == shape else buf[tuple(slice(0, n) for n in shape)]


def _centre(xb: torch.Tensor, hi: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``xb - hi`` into ``out``; a low-precision block is upcast by a plain copy first
    (faster than a mixed-dtype ``sub``)."""
    if xb.dtype == out.dtype:
        return torch.sub(xb, hi, out=out)
    return out.copy_(xb).sub_(hi)


def _scale_shift_(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None):
    """``z * scale + shift`` in place; ``scale`` and ``shift`` broadcast per channel.

    One fused ``addcmul`` when channels are the innermost axis (channels_last,
    ``(N, C)``); two ops otherwise, because PyTorch's CPU kernels vectorize an
    elementwise op with one broadcast operand but not with two (NCHW
    ``addcmul`` runs ~4x slower than ``mul_`` plus ``add_``).
    """
    if shift is None:
        return z.mul_(scale)
    if z.dim() > 2 and z.stride(1) != 1:
        return z.mul_(scale).add_(shift)
    return torch.addcmul(shift, z, scale, out=z)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x``, reading ``x`` from memory once.

    The corrected two-pass algorithm: a shift ``hi`` near the mean, then the
    centred sums ``lo = mean(x - hi)`` and ``mean((x - hi)^2)``, so
    ``var = mean((x - hi)^2) - lo^2`` and ``mean = hi + lo``. The subtraction
    loses nothing while ``lo^2`` is small next to ``var``: large offsets
    (mean 1e4, std 1e-2) keep full accuracy where ``E[x^2] - E[x]^2`` would
    lose every digit, and torch's fast cascade sums beat ``torch.var_mean``
    several times over.

    Block by block, ``hi`` is the mean of the first block; every block is
    centred and summed while it is in cache. If ``lo^2 > var`` in some channel
    (the first block was not representative) the sums are taken again around
    the mean just found, so the accuracy never depends on the data's order.

    Returns:
        ``(mean, var)``: ``var`` in the compute dtype; ``mean`` as float64
        ``hi + lo`` so :func:`normalize` and :func:`backward` can centre with
        more than float32's precision (PyTorch's CPU kernels accumulate
        float32 statistics in float64; a float32 mean alone loses accuracy
        on tiny, nearly constant batches).
    """
    dims = reduce_dims(x)
    C = x.shape[1]
    m = x.numel() // C
    cdtype = compute_dtype(x.dtype)
    nd = x.dim()
    blocks = _blocks(x)
    if len(blocks) == 1:
        if x.dtype == cdtype:
            hi = x.mean(dims)
            xc = x - channel_view(hi, nd)
        else:  # low precision: centre the float32 copy in place
            xc = x.to(cdtype)
            hi = xc.mean(dims)
            xc.sub_(channel_view(hi, nd))
        lo = xc.mean(dims)
        var = torch.addcmul(xc.square_().mean(dims), lo, lo, value=-1).clamp_(min=0)
        return hi.double().add_(lo), var
    buf = _scratch(x, blocks, cdtype)
    hi = None
    for _ in range(2):
        los = torch.empty(len(blocks), C, dtype=cdtype, device=x.device)
        sqs = torch.empty_like(los)
        for k, idx in enumerate(blocks):
            xb = x[idx]
            xc = _fit(buf, xb.shape)
            if xb.dtype != cdtype:
                xb = xc.copy_(xb)
            if hi is None:
                hi = channel_view(xb.mean(dims), nd)
            torch.sub(xb, hi, out=xc)
            torch.sum(xc, dims, out=los[k])
            torch.sum(xc.square_(), dims, out=sqs[k])
        lo = los.sum(0).div_(m)
        ex2 = sqs.sum(0).div_(m)
        lo2 = lo * lo
        # One host sync per call, on the CPU only (blocks exist only there).
        if not bool((lo2 > 0.5 * ex2).any()):
            break
        hi = (hi.double() + channel_view(lo, nd).double()).to(cdtype)
    var = ex2.sub_(lo2).clamp_(min=0)
    return hi.flatten().double() + lo.double(), var


def forward(x, running_mean, running_var, weight, bias, residual, training, eps,
            activation, negative_slope):
    """The whole forward: statistics (batch or running), then :func:`normalize`.

    Returns:
        ``(out, act_saved, mean, var, invstd)``: the output and what the
        backward needs from the activation (see :func:`normalize`), and the
        per-channel statistics used (batch ``mean``/biased ``var`` in training,
        the running ones otherwise; an empty batch gives mean 0 and var 1).
    """
    cdtype = compute_dtype(x.dtype)
    if not training:
        mean, var = running_mean.to(cdtype), running_var.to(cdtype)
    elif x.numel() == 0:
        mean = torch.zeros(x.shape[1], dtype=cdtype, device=x.device)
        var = torch.ones(x.shape[1], dtype=cdtype, device=x.device)
    else:
        mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    out, act_saved = normalize(x, mean, invstd, weight, bias, residual, activation,
                               negative_slope)
    return out, act_saved, mean, var, invstd


def split_mean(mean: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``mean`` as ``hi + lo`` in ``dtype``: centre with ``hi``, correct with ``lo``.

    ``lo`` is ``None`` when ``mean`` is already in ``dtype`` (nothing to correct).
    """
    if mean.dtype == dtype:
        return mean, None
    hi = mean.to(dtype)
    return hi, (mean - hi).to(dtype)


def _activate_(z: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """Apply the activation, in place where PyTorch has an in-place form."""
    if activation is None:
        return z
    if activation == "relu":
        return z.relu_()
    if activation == "leaky_relu":
        return F.leaky_relu_(z, negative_slope)
    if activation == "sigmoid":
        return z.sigmoid_()
    if activation == "tanh":
        return z.tanh_()
    if activation == "silu":
        return F.silu(z, inplace=True)
    if activation == "gelu":
        return F.gelu(z)
    raise ValueError(f"unknown activation {activation!r}")


def _affine(mean, invstd, weight, bias, nd):
    """Per-channel ``hi``, ``scale``, ``shift`` (views for broadcasting) such that
    ``weight * (x - mean) * invstd + bias == (x - hi) * scale + shift``."""
    cdtype = invstd.dtype
    scale = invstd if weight is None else invstd * weight.to(cdtype)
    hi, lo = split_mean(mean, cdtype)
    b = None if bias is None else bias.to(cdtype)
    if lo is None:
        shift = b
    else:
        shift = -lo * scale if b is None else torch.addcmul(b, lo, scale, value=-1)
    return (channel_view(hi, nd), channel_view(scale, nd),
            None if shift is None else channel_view(shift, nd))


def normalize(x, mean, invstd, weight, bias, residual=None, activation=None,
              negative_slope=0.01):
    """``act(weight * (x - mean) * invstd + bias + residual)`` in one output buffer.

    Centres first and then scales, ``(x - mean) * scale + bias``: folding the
    mean into a shift (``x * scale + shift``) saves a pass but cancels
    catastrophically when ``invstd`` is large (a tiny batch variance) or the
    data sit far from zero, and loses ~10x PyTorch's accuracy there. Block by
    block, so centring, scaling, the residual and the activation read ``x``
    from memory once and write the output once.

    Returns:
        ``(out, act_saved)``: the output (dtype and memory format of ``x``), and
        what the activation's backward needs (``out`` itself, the
        pre-activation, or ``None`` without an activation).
    """
    cdtype = invstd.dtype
    hi, scale, shift = _affine(mean, invstd, weight, bias, x.dim())
    if not saves_output(activation, negative_slope):
        # silu / gelu (and leaky_relu with slope <= 0) keep the pre-activation
        # for the backward: a full-size tensor in the compute dtype anyway.
        z = _scale_shift_(torch.sub(x, hi), scale, shift)
        if residual is not None:
            z.add_(residual)
        # In-place activations must not overwrite the saved pre-activation.
        inplace = activation in ("silu", "leaky_relu")
        out = _activate_(z.clone() if inplace else z, activation, negative_slope)
        return out.to(x.dtype), z
    # Elementwise ops into ``out`` keep the strides of x (contiguous,
    # channels_last, permuted).
    out = torch.empty_like(x)
    blocks = _blocks(x)
    # Low precision computes in a float32 block and rounds once, on the copy out.
    buf = _scratch(x, blocks, cdtype) if x.dtype != cdtype else None
    for idx in blocks:
        xb, ob = x[idx], out[idx]
        zb = ob if buf is None else _fit(buf, xb.shape)
        _scale_shift_(_centre(xb, hi, zb), scale, shift)
        if residual is not None:
            zb.add_(residual[idx])
        _activate_(zb, activation, negative_slope)
        if zb is not ob:
            ob.copy_(zb)
    return out, (None if activation is None else out)


def _activation_grad(grad_out, act_saved, activation, negative_slope, out=None):
    """``grad_out * act'(z)`` from the saved output or pre-activation.

    ReLU and leaky ReLU use PyTorch's own elementwise backward kernels (one
    pass, written into ``out`` when given); a mask built with comparisons
    (``masked_fill``, ``where``) is ~10x slower on the CPU.
    """
    if out is not None and out.dtype != grad_out.dtype:
        # Upcast first: PyTorch's kernels are slow to write float32 from
        # bfloat16 operands in some layouts (channels_last: ~20x).
        grad_out = out.copy_(grad_out)
    if activation is None:
        return grad_out if out is None or grad_out is out else out.copy_(grad_out)
    a = act_saved
    if activation == "relu":
        if out is None:
            return torch.ops.aten.threshold_backward(grad_out, a, 0)
        return torch.ops.aten.threshold_backward.grad_input(grad_out, a, 0, grad_input=out)
    if activation == "leaky_relu" and negative_slope > 0:
        if out is None:
            return torch.ops.aten.leaky_relu_backward(grad_out, a, negative_slope, True)
        return torch.ops.aten.leaky_relu_backward.grad_input(grad_out, a, negative_slope, True,
                                                             grad_input=out)
    if activation == "leaky_relu":
        g = torch.where(a > 0, grad_out, grad_out * negative_slope)
        return g if out is None else out.copy_(g)
    a = _upcast(a)
    if activation == "sigmoid":
        g = grad_out * a * (1 - a)
    elif activation == "tanh":
        g = grad_out * (1 - a * a)
    elif activation == "silu":
        s = torch.sigmoid(a)
        g = grad_out * s * (1 + a * (1 - s))
    elif activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(a * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * a * a) * (1 / math.sqrt(2 * math.pi))
        g = grad_out * (cdf + a * pdf)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return g if out is None else out.copy_(g)


def _materialises_g(activation: str | None, negative_slope: float) -> bool:
    """Whether the activation's derivative needs full-size temporaries anyway, so
    ``g`` (the gradient after the activation) is better built once, whole."""
    return activation not in (None, "relu", "leaky_relu") or (
        activation == "leaky_relu" and negative_slope <= 0)


def _g_source(grad_out, x, act_saved, activation, negative_slope, g_full, blocks):
    """``idx -> g[idx]`` in the compute dtype, one block at a time.

    From ``g_full`` when it exists, else from ``grad_out`` through the
    activation's derivative, into one block-sized scratch buffer reused by
    every block (and every pass that shares this function).
    """
    cdtype = compute_dtype(x.dtype)
    low = x.dtype != cdtype
    gbuf = None
    if low or (g_full is None and activation is not None):
        gbuf = _scratch(x, blocks, cdtype)

    def g_block(idx):
        if g_full is not None:
            gb = g_full[idx]
            return _fit(gbuf, gb.shape).copy_(gb) if low else gb
        gb = grad_out[idx]
        if gbuf is None:
            return gb
        a = None if act_saved is None else act_saved[idx]
        return _activation_grad(gb, a, activation, negative_slope, out=_fit(gbuf, gb.shape))

    return g_block


def _sums(g_block, x, hi_v, lo, blocks, need_gxc):
    """``(sum(g), sum(g * (x - mean)))`` per channel (the second ``None`` unless
    ``need_gxc``), with ``mean = hi + lo``."""
    dims = reduce_dims(x)
    xbuf = _scratch(x, blocks, hi_v.dtype) if need_gxc and len(blocks) > 1 else None
    sg, sgx = [], []
    for idx in blocks:
        gb = g_block(idx)
        sg.append(gb.sum(dims))
        if need_gxc:
            xb = x[idx]
            xc = torch.sub(xb, hi_v) if xbuf is None else _centre(xb, hi_v, _fit(xbuf, xb.shape))
            sgx.append(xc.mul_(gb).sum(dims))
    sum_g = sg[0] if len(sg) == 1 else torch.stack(sg).sum(0)
    sum_gxc = None
    if need_gxc:
        sum_gxc = sgx[0] if len(sgx) == 1 else torch.stack(sgx).sum(0)
        if lo is not None:  # x - mean == (x - hi) - lo
            sum_gxc = torch.addcmul(sum_gxc, lo, sum_g, value=-1)
    return sum_g, sum_gxc


def _grad_input(g_block, x, hi_v, lo, invstd, weight, sum_g, sum_gxc, count, training, blocks):
    """``grad_input`` from the per-channel sums over ``count`` elements per channel."""
    nd = x.dim()
    cdtype = invstd.dtype
    scale = invstd if weight is None else invstd * weight.to(cdtype)
    scale_v = channel_view(scale, nd)
    if training:
        neg_inv_m = -1 / max(count, 1)  # an empty batch has nothing to scale
        k = scale * invstd * invstd * sum_gxc * neg_inv_m
        c = scale * sum_g * neg_inv_m
        if lo is not None:
            c = torch.addcmul(c, k, lo, value=-1)
        k_v, c_v = channel_view(k, nd), channel_view(c, nd)
    grad_input = torch.empty_like(x)
    tbuf = _scratch(x, blocks, cdtype) if x.dtype != cdtype else None
    for idx in blocks:
        gb = g_block(idx)
        ob = grad_input[idx]
        t = ob if tbuf is None else _fit(tbuf, ob.shape)
        if training:
            # k * (x - hi) + c + scale * g
            _scale_shift_(_centre(x[idx], hi_v, t), k_v, c_v).addcmul_(gb, scale_v)
        else:
            torch.mul(gb, scale_v, out=t)
        if t is not ob:
            ob.copy_(t)
    return grad_input


def _count(x: torch.Tensor) -> int:
    """Elements per channel."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def backward(grad_out, x, mean, invstd, weight, act_saved=None, activation=None,
             negative_slope=0.01, training=True, needs_input_grad=(True, True, True, True)):
    """Analytic backward of :func:`normalize` (and of the batch statistics).

    With ``g`` the gradient after the activation, ``M`` the elements per
    channel and ``xc = x - mean``::

        grad_bias   = sum(g)
        grad_weight = invstd * sum(g * xc)
        grad_input  = weight * invstd * (g - sum(g) / M - xc * invstd^2 * sum(g * xc) / M)

    (in eval mode only the first term: the statistics are constants). Two
    passes block by block, the sums and then ``grad_input``; ``g`` and ``xc``
    exist only block-sized, in cache, and ``sum(g * xc)`` is taken on the
    centred ``xc``, never as ``sum(g * x) - mean * sum(g)``.

    The two passes are also exposed separately, :func:`backward_reduce` and
    :func:`backward_elementwise`, so that :class:`batchnorm.nn.SyncBatchNorm`
    can sum the per-channel sums over processes in between; this function is
    their composition, sharing one scratch buffer.

    Returns:
        ``(grad_input, grad_weight, grad_bias, grad_residual)``, ``None`` where
        ``needs_input_grad`` says the gradient is not wanted.
    """
    need_x, need_w, need_b, need_r = needs_input_grad
    cdtype = invstd.dtype
    hi, lo = split_mean(mean, cdtype)
    hi_v = channel_view(hi, x.dim())
    # The residual's gradient is g itself, and the smooth activations need
    # full-size temporaries anyway: then g is materialised once.
    g_full = None
    if need_r or _materialises_g(activation, negative_slope):
        g_full = _activation_grad(grad_out, act_saved, activation, negative_slope)
    blocks = _blocks(x)
    g_block = _g_source(grad_out, x, act_saved, activation, negative_slope, g_full, blocks)
    need_gxc = need_w or (need_x and training)
    sum_g = sum_gxc = None
    if need_b or need_gxc:
        sum_g, sum_gxc = _sums(g_block, x, hi_v, lo, blocks, need_gxc)
    grad_weight = sum_gxc * invstd if need_w else None
    grad_bias = sum_g if need_b else None
    grad_input = None
    if need_x:
        grad_input = _grad_input(g_block, x, hi_v, lo, invstd, weight, sum_g, sum_gxc,
                                 _count(x), training, blocks)
    if grad_weight is not None and weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    grad_residual = g_full if need_r else None
    return grad_input, grad_weight, grad_bias, grad_residual


def backward_reduce(grad_out, x, mean, act_saved=None, activation=None, negative_slope=0.01,
                    need_gxc=True, keep_g=False):
    """First pass of :func:`backward`: the per-channel sums of this ``x`` alone.

    ``sum(g * (x - mean))`` is centred on the ``mean`` given, so with the
    global mean of a batch split over processes the sums of every process
    add up to the sums of the whole batch.

    Args:
        grad_out, x, act_saved, activation, negative_slope: as in :func:`backward`.
        mean: ``(C,)`` mean the forward normalized with (float64 ``hi + lo`` or
            the compute dtype).
        need_gxc: compute ``sum_gxc`` (``grad_weight`` and the training
            ``grad_input`` need it). Default: ``True``.
        keep_g: return the full-size ``g`` (the residual's gradient). Default:
            ``False``.

    Returns:
        ``(sum_g, sum_gxc, g)``: ``(C,)`` sums in the compute dtype
        (``sum_gxc`` ``None`` unless ``need_gxc``), and ``g`` (the gradient
        after the activation, full size) when it was materialised, because
        ``keep_g`` asked or the activation needs it whole; pass it on to
        :func:`backward_elementwise` to avoid computing it twice.
    """
    cdtype = compute_dtype(x.dtype)
    hi, lo = split_mean(mean, cdtype)
    g_full = None
    if keep_g or _materialises_g(activation, negative_slope):
        g_full = _activation_grad(grad_out, act_saved, activation, negative_slope)
    blocks = _blocks(x)
    g_block = _g_source(grad_out, x, act_saved, activation, negative_slope, g_full, blocks)
    sum_g, sum_gxc = _sums(g_block, x, channel_view(hi, x.dim()), lo, blocks, need_gxc)
    return sum_g, sum_gxc, g_full


def backward_elementwise(grad_out, x, mean, invstd, weight, sum_g, sum_gxc, count,
                         act_saved=None, activation=None, negative_slope=0.01, training=True,
                         g=None):
    """Second pass of :func:`backward`: ``grad_input`` from given per-channel sums.

    Args:
        grad_out, x, mean, invstd, weight, act_saved, activation,
            negative_slope, training: as in :func:`backward`.
        sum_g, sum_gxc: ``(C,)`` sums over the whole batch (from
            :func:`backward_reduce`, added up over processes); unused in eval
            mode (``training=False``), where they may be ``None``.
        count: elements per channel of the whole batch (``M``).
        g: the full-size ``g`` returned by :func:`backward_reduce`, if any.

    Returns:
        ``grad_input``: dtype and memory format of ``x``.
    """
    hi, lo = split_mean(mean, invstd.dtype)
    if g is None and _materialises_g(activation, negative_slope):
        g = _activation_grad(grad_out, act_saved, activation, negative_slope)
    blocks = _blocks(x)
    g_block = _g_source(grad_out, x, act_saved, activation, negative_slope, g, blocks)
    return _grad_input(g_block, x, channel_view(hi, x.dim()), lo, invstd, weight, sum_g,
                       sum_gxc, count, training, blocks)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update, in place: ``(1 - momentum) * running + momentum * batch``.

    ``running_var`` takes the unbiased variance ``var * count / (count - 1)``.
    """
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype),
                                            alpha=momentum * count / (count - 1))
