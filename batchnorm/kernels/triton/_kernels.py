"""The Triton kernels of the GPU backend (driven by :mod:`batchnorm.kernels.triton`).

Every kernel sees the input as one of two row-major matrices, without a copy:

* **planar** ``(N, C, L)``, a contiguous NCHW / NCL / NCDHW tensor: a channel
  is ``N`` runs of ``L`` contiguous elements, one every ``C * L``;
* **rows** ``(M, C)``, a channels_last / channels_last_3d / ``(N, C)`` tensor:
  ``M = N * L`` rows of ``C`` contiguous channels.

The elementwise kernels (``apply``, ``grad_input``) treat both as an
``(R, K)`` matrix whose channel is the row index modulo ``C`` (planar:
``R = N * C``, ``K = L``) or the column (rows: ``R = M``, ``K = C``), so one
kernel serves both with a compile-time flag ``CH_ON_ROWS``.

Inputs are float32, float16 or bfloat16; everything is computed in float32
(float64 input takes the portable path: GPUs are slow at it and Triton's
scalar arguments are float32).

The reductions are split: many programs each reduce a slice of a channel to
float32 partials, and one small ``finalize`` kernel merges them **in a fixed
order** per channel. No atomics, no locks: the same input gives the same bits
on every run.

Statistics: every program centres its elements on ``hi``, the mean of the
channel's first tile (the same value in every program of the channel), and
accumulates ``sum(x - hi)`` and ``sum((x - hi)^2)`` elementwise in registers;
the program's ``(count, mean, M2)`` relative to ``hi`` go out as partials and
are merged with Chan et al.'s formula. The centring keeps the sums small for
data far from zero (mean 1e4, std 1e-2): ``x - hi`` is exact there, and the
output is computed as ``(x - hi) * scale + shift`` with the small remainder
of the mean folded into ``shift``, never as ``x * scale + b`` (which
cancels). The float64 mean handed back is ``hi + mean_rel``.

Activation codes (``ACT``): 0 none, 1 relu, 2 leaky_relu, 3 silu, 4 gelu
(erf form), 5 sigmoid, 6 tanh. The backward reads the activation's derivative
off the output for relu, sigmoid, tanh and leaky_relu with a positive slope,
off the saved pre-activation otherwise (the driver passes whichever it saved).
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "sigmoid": 5, "tanh": 6}

# Globals a kernel reads must be constexpr (the interpreter does not check).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _wide(i, BIG: tl.constexpr):
    """Indices as int64 when the tensor has 2**31 elements or more."""
    if BIG:  # one return: branches returning different types do not compile
        i = i.to(tl.int64)
    return i


@triton.jit
def _activate(z, ACT: tl.constexpr, slope):
    """The activation of the pre-activation ``z``; NaN stays NaN (as in PyTorch)."""
    if ACT == 1:
        return tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        return tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        return z * tl.sigmoid(z)
    elif ACT == 4:
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 5:
        return tl.sigmoid(z)
    elif ACT == 6:
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -t, t)
    else:
        return z


@triton.jit
def _activation_grad(dy, a, ACT: tl.constexpr, slope):
    """``dy * act'`` from ``a``: the output (relu, sigmoid, tanh, leaky_relu with a
    positive slope) or the pre-activation (silu, gelu, leaky_relu otherwise)."""
    if ACT == 1:
        return tl.where(a <= 0, 0.0, dy)  # PyTorch's threshold_backward
    elif ACT == 2:
        # (``tl.where(a > 0, dy, dy * slope)`` crashes Triton 3.9's compiler for
        # float32 when the result only feeds reductions.)
        return dy * tl.where(a > 0, 1.0, slope)
    elif ACT == 3:
        s = tl.sigmoid(a)
        return dy * s * (1.0 + a * (1.0 - s))
    elif ACT == 4:
        cdf = 0.5 * (1.0 + tl.math.erf(a * _SQRT1_2))
        return dy * (cdf + a * tl.exp(-0.5 * a * a) * _INV_SQRT_2PI)
    elif ACT == 5:
        return dy * a * (1.0 - a)
    elif ACT == 6:
        return dy * (1.0 - a * a)
    else:
        return dy


@triton.jit
def _plane_tile(t, c, N, L, stride_n, tiles_l, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                BIG: tl.constexpr):
    """Offsets and mask of tile ``t`` (row-major over ``tiles_l`` tiles per row) of
    channel ``c``'s ``(N, L)`` plane in a planar tensor."""
    tn = t // tiles_l
    n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    l_ = (t - tn * tiles_l) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (n[:, None] < N) & (l_[None, :] < L)
    return _wide(c, BIG) * L + _wide(n, BIG)[:, None] * stride_n + l_[None, :], mask


@triton.jit
def stats_planar(x_ptr, hi_ptr, part_ptr, N, C, L, stride_n, tiles_l, tiles_per_prog,
                 num_tiles, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                 BIG: tl.constexpr):
    """Partials ``(count, mean, M2)`` of channel ``program_id(0)``, slice ``program_id(1)``.

    The channel's ``(N, L)`` plane is cut into ``BLOCK_N x BLOCK_L`` tiles,
    numbered row-major; program ``s`` takes tiles ``[s * tiles_per_prog, ...)``.
    ``part`` is ``(3, S, C)``; ``hi`` (the first tile's mean) is written by slice 0.
    """
    c = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    offs0, mask0 = _plane_tile(0, c, N, L, stride_n, tiles_l, BLOCK_N, BLOCK_L, BIG)
    x0 = tl.load(x_ptr + offs0, mask=mask0, other=0.0).to(tl.float32)
    hi = tl.sum(tl.sum(x0, 1), 0) / tl.sum(tl.sum(mask0.to(tl.float32), 1), 0)
    s1 = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
    s2 = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
    k = tl.zeros([BLOCK_N, BLOCK_L], tl.int32)
    start = s * tiles_per_prog
    stop = tl.minimum(start + tiles_per_prog, num_tiles)
    for t in range(start, stop):
        offs, mask = _plane_tile(t, c, N, L, stride_n, tiles_l, BLOCK_N, BLOCK_L, BIG)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - hi, 0.0)
        s1 += v
        s2 += v * v
        k += mask.to(tl.int32)
    _store_partial(part_ptr, s, S, C, c, tl.sum(tl.sum(k, 1), 0).to(tl.float32),
                   tl.sum(tl.sum(s1, 1), 0), tl.sum(tl.sum(s2, 1), 0))
    if s == 0:
        tl.store(hi_ptr + c, hi)


@triton.jit
def _store_partial(part_ptr, s, S, C, c, count, s1, s2):
    """``(count, mean, M2)`` of one slice from its count and centred sums."""
    mean = s1 / count
    m2 = s2 - s1 * mean
    m2 = tl.where(m2 < 0, 0.0, m2)  # rounding; NaN passes
    tl.store(part_ptr + s * C + c, count)
    tl.store(part_ptr + (S + s) * C + c, mean)
    tl.store(part_ptr + (2 * S + s) * C + c, m2)


@triton.jit
def _rows_tile(r0, stop, c, cmask, C, BLOCK_M: tl.constexpr, BIG: tl.constexpr):
    """Offsets and mask of rows ``[r0, min(r0 + BLOCK_M, stop))``, channels ``c``, of a
    rows-layout tensor."""
    r = r0 + tl.arange(0, BLOCK_M)
    return _wide(r, BIG)[:, None] * C + c[None, :], (r[:, None] < stop) & cmask[None, :]


@triton.jit
def stats_rows(x_ptr, hi_ptr, part_ptr, M, C, rows_per_prog,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BIG: tl.constexpr):
    """Partials ``(count, mean, M2)`` of channels ``program_id(0) * BLOCK_C + ...`` over
    rows ``[program_id(1) * rows_per_prog, ...)``; ``part`` is ``(3, S, C)``."""
    cb = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    offs0, mask0 = _rows_tile(0, M, c, cmask, C, BLOCK_M, BIG)
    x0 = tl.load(x_ptr + offs0, mask=mask0, other=0.0).to(tl.float32)
    hi = tl.sum(x0, 0) / tl.minimum(M, BLOCK_M).to(tl.float32)
    s1 = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    s2 = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    start = _wide(s, BIG) * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, stop, BLOCK_M):
        offs, mask = _rows_tile(r0, stop, c, cmask, C, BLOCK_M, BIG)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - hi[None, :], 0.0)
        s1 += v
        s2 += v * v
    count = (stop - start).to(tl.float32)
    sum1 = tl.sum(s1, 0)
    mean = sum1 / count
    m2 = tl.sum(s2, 0) - sum1 * mean
    m2 = tl.where(m2 < 0, 0.0, m2)
    tl.store(part_ptr + s * C + c, tl.zeros([BLOCK_C], tl.float32) + count, mask=cmask)
    tl.store(part_ptr + (S + s) * C + c, mean, mask=cmask)
    tl.store(part_ptr + (2 * S + s) * C + c, m2, mask=cmask)
    if s == 0:
        tl.store(hi_ptr + c, hi, mask=cmask)


@triton.jit
def finalize_stats(part_ptr, S, C, eps, hi_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, invstd_ptr,
                   scale_ptr, shift_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Merge the ``S`` partials of each channel in slice order (Chan et al.), then the
    per-channel values the apply pass and the caller need:

    ``mean`` (float64, ``hi + mean_rel``), biased ``var``, ``invstd``, and
    ``scale = invstd * w``, ``shift = b - mean_rel * scale`` so that
    ``y = (x - hi) * scale + shift``.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s in range(0, S):
        nb = tl.load(part_ptr + s * C + c, mask=cmask, other=1.0)
        mb = tl.load(part_ptr + (S + s) * C + c, mask=cmask, other=0.0)
        m2b = tl.load(part_ptr + (2 * S + s) * C + c, mask=cmask, other=0.0)
        total = n + nb
        delta = mb - mean
        mean += delta * (nb / total)
        m2 += m2b + delta * delta * (n * (nb / total))
        n = total
    var = m2 / n
    invstd = 1.0 / tl.sqrt(var + eps)
    hi = tl.load(hi_ptr + c, mask=cmask, other=0.0)
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + c, hi.to(tl.float64) + mean.to(tl.float64), mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    tl.store(invstd_ptr + c, invstd, mask=cmask)
    tl.store(scale_ptr + c, scale, mask=cmask)
    tl.store(shift_ptr + c, shift, mask=cmask)


@triton.jit
def prepare_affine(mean_ptr, var_ptr, w_ptr, b_ptr, C, eps, hi_ptr, invstd_ptr, scale_ptr,
                   shift_ptr, FROM_VAR: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """``hi``, ``scale``, ``shift`` (and ``invstd``) from a given mean and either the
    variance (``FROM_VAR``: eval mode, ``invstd = 1 / sqrt(var + eps)`` is
    written) or ``invstd`` itself (read from ``invstd_ptr``). A float64 mean
    is split as ``hi + lo`` in the compute dtype."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    m = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    hi = m.to(tl.float32)
    lo = (m - hi.to(m.dtype)).to(tl.float32)
    if FROM_VAR:
        invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0).to(tl.float32) + eps)
        tl.store(invstd_ptr + c, invstd, mask=cmask)
    else:
        invstd = tl.load(invstd_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    shift = -lo * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(hi_ptr + c, hi, mask=cmask)
    tl.store(scale_ptr + c, scale, mask=cmask)
    tl.store(shift_ptr + c, shift, mask=cmask)


@triton.jit
def _tile(pid_r, pid_k, R, K, C, CH_ON_ROWS: tl.constexpr, FLAT: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """Offsets, mask and channel index of one ``BLOCK_R x BLOCK_K`` tile of ``(R, K)``.

    ``FLAT`` (planar only): the tile is ``BLOCK_R * BLOCK_K`` consecutive
    elements of the whole tensor and the channel is computed per element,
    ``(offset // K) % C``: for ``K`` (= ``H*W``) not a multiple of 16, rows
    start unaligned and a row tile would load one element per instruction.
    """
    if FLAT:
        start = _wide(pid_r, BIG) * (BLOCK_R * BLOCK_K)
        offs = start + (tl.arange(0, BLOCK_R)[:, None] * BLOCK_K
                        + tl.arange(0, BLOCK_K)[None, :])
        mask = offs < _wide(R, BIG) * K
        ch = (offs // K) % C
    else:
        r = _wide(pid_r, BIG) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (r[:, None] < R) & (k[None, :] < K)
        offs = r[:, None] * K + k[None, :]
        if CH_ON_ROWS:
            ch = (r % C)[:, None]
        else:
            ch = k[None, :]
    return offs, mask, ch


@triton.jit
def apply(x_ptr, res_ptr, out_ptr, pre_ptr, hi_ptr, scale_ptr, shift_ptr, R, K, C, slope,
          CH_ON_ROWS: tl.constexpr, FLAT: tl.constexpr, ACT: tl.constexpr,
          HAS_RES: tl.constexpr,
          SAVE_PRE: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """``out = act((x - hi) * scale + shift + residual)``; ``pre`` (the
    pre-activation, compute dtype) when ``SAVE_PRE``."""
    offs, mask, ch = _tile(tl.program_id(0), tl.program_id(1), R, K, C, CH_ON_ROWS, FLAT,
                           BLOCK_R, BLOCK_K, BIG)
    cmask = ch < C
    hi = tl.load(hi_ptr + ch, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + ch, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + ch, mask=cmask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - hi) * scale + shift
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAVE_PRE:
        tl.store(pre_ptr + offs, z, mask=mask)
    y = _activate(z, ACT, slope)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_mean(mean_ptr, c, cmask):
    """A channel's mean as ``hi + lo`` in the compute dtype (``lo = 0`` unless float64)."""
    m = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    hi = m.to(tl.float32)
    return hi, (m - hi.to(m.dtype)).to(tl.float32)


@triton.jit
def _grad_terms(dy_ptr, x_ptr, a_ptr, g_ptr, offs, mask, hi, slope, ACT: tl.constexpr,
                KEEP_G: tl.constexpr):
    """One tile's ``g = dy * act'`` and ``g * (x - hi)``, zero outside ``mask``;
    ``g`` is stored when ``KEEP_G``."""
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _activation_grad(g, a, ACT, slope)
    if KEEP_G:
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask, g, 0.0)
    return g, g * tl.where(mask, x - hi, 0.0)


@triton.jit
def grad_sums_planar(dy_ptr, x_ptr, a_ptr, g_ptr, mean_ptr, part_ptr, N, C, L, stride_n,
                     tiles_l, tiles_per_prog, num_tiles, slope, ACT: tl.constexpr,
                     KEEP_G: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_L: tl.constexpr, BIG: tl.constexpr):
    """Partials of ``sum(g)`` and ``sum(g * (x - hi))`` (``part`` is ``(2, S, C)``),
    ``g = dy * act'``, tiled as in :func:`stats_planar`; ``g`` is stored when
    ``KEEP_G`` (the residual's gradient)."""
    c = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    hi, _ = _split_mean(mean_ptr, c, c < C)
    sg = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
    sgx = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
    start = s * tiles_per_prog
    stop = tl.minimum(start + tiles_per_prog, num_tiles)
    for t in range(start, stop):
        offs, mask = _plane_tile(t, c, N, L, stride_n, tiles_l, BLOCK_N, BLOCK_L, BIG)
        g, gxc = _grad_terms(dy_ptr, x_ptr, a_ptr, g_ptr, offs, mask, hi, slope, ACT, KEEP_G)
        sg += g
        sgx += gxc
    tl.store(part_ptr + s * C + c, tl.sum(tl.sum(sg, 1), 0))
    tl.store(part_ptr + (S + s) * C + c, tl.sum(tl.sum(sgx, 1), 0))


@triton.jit
def grad_sums_rows(dy_ptr, x_ptr, a_ptr, g_ptr, mean_ptr, part_ptr, M, C, rows_per_prog,
                   slope, ACT: tl.constexpr, KEEP_G: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BIG: tl.constexpr):
    """:func:`grad_sums_planar` for the rows layout, tiled as in :func:`stats_rows`."""
    cb = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    hi, _ = _split_mean(mean_ptr, c, cmask)
    sg = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    sgx = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    start = _wide(s, BIG) * rows_per_prog
    stop = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, stop, BLOCK_M):
        offs, mask = _rows_tile(r0, stop, c, cmask, C, BLOCK_M, BIG)
        g, gxc = _grad_terms(dy_ptr, x_ptr, a_ptr, g_ptr, offs, mask, hi[None, :], slope, ACT,
                             KEEP_G)
        sg += g
        sgx += gxc
    tl.store(part_ptr + s * C + c, tl.sum(sg, 0), mask=cmask)
    tl.store(part_ptr + (S + s) * C + c, tl.sum(sgx, 0), mask=cmask)


@triton.jit
def finalize_grad(part_ptr, S, sums_ptr, mean_ptr, invstd_ptr, w_ptr, coef_ptr, C, inv_count,
                  SUMS: tl.constexpr, COEF: tl.constexpr, TRAINING: tl.constexpr,
                  HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-channel sums and the coefficients of ``grad_input``.

    ``SUMS``: 0 none (eval ``grad_input`` only), 1 merge the ``(2, S, C)``
    partials in slice order and write ``sums`` = ``(sum_g, sum_g*(x - mean),
    grad_weight)``, 2 read ``sum_g`` and ``sum_g*(x - mean)`` from ``sums``
    (added up over processes by SyncBatchNorm). ``COEF``: write ``coef`` =
    ``(scale, kx, c0)`` so that ``grad_input = scale * g + kx * (x - hi) + c0``
    (training) or ``scale * g`` (eval).
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    hi, lo = _split_mean(mean_ptr, c, cmask)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    sg = tl.zeros([BLOCK_C], tl.float32)
    sgx = tl.zeros([BLOCK_C], tl.float32)
    if SUMS == 1:
        for s in range(0, S):
            sg += tl.load(part_ptr + s * C + c, mask=cmask, other=0.0)
            sgx += tl.load(part_ptr + (S + s) * C + c, mask=cmask, other=0.0)
        sgx -= lo * sg  # x - mean == (x - hi) - lo
        tl.store(sums_ptr + c, sg, mask=cmask)
        tl.store(sums_ptr + C + c, sgx, mask=cmask)
        tl.store(sums_ptr + 2 * C + c, sgx * invstd, mask=cmask)
    elif SUMS == 2:
        sg = tl.load(sums_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        sgx = tl.load(sums_ptr + C + c, mask=cmask, other=0.0).to(tl.float32)
    if COEF:
        scale = invstd
        if HAS_W:
            scale = invstd * tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32)
        kx = tl.zeros([BLOCK_C], tl.float32)
        c0 = tl.zeros([BLOCK_C], tl.float32)
        if TRAINING:
            kx = -scale * invstd * invstd * sgx * inv_count
            c0 = -scale * sg * inv_count - kx * lo
        tl.store(coef_ptr + c, scale, mask=cmask)
        tl.store(coef_ptr + C + c, kx, mask=cmask)
        tl.store(coef_ptr + 2 * C + c, c0, mask=cmask)


@triton.jit
def grad_input(dy_ptr, x_ptr, a_ptr, g_ptr, mean_ptr, coef_ptr, dx_ptr, R, K, C, slope,
               CH_ON_ROWS: tl.constexpr, FLAT: tl.constexpr, ACT: tl.constexpr,
               USE_G: tl.constexpr,
               TRAINING: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """``dx = scale * g + kx * (x - hi) + c0`` (eval: ``scale * g``), ``g`` read
    (``USE_G``) or recomputed from ``dy`` and the saved activation."""
    offs, mask, ch = _tile(tl.program_id(0), tl.program_id(1), R, K, C, CH_ON_ROWS, FLAT,
                           BLOCK_R, BLOCK_K, BIG)
    cmask = ch < C
    if USE_G:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = _activation_grad(g, a, ACT, slope)
    dx = g * tl.load(coef_ptr + ch, mask=cmask, other=0.0)
    if TRAINING:
        hi, _ = _split_mean(mean_ptr, ch, cmask)
        kx = tl.load(coef_ptr + C + ch, mask=cmask, other=0.0)
        c0 = tl.load(coef_ptr + 2 * C + ch, mask=cmask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx += kx * (x - hi) + c0
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def update_running(rm_ptr, rv_ptr, mean_ptr, var_ptr, C, momentum, unbias,
                   BLOCK_C: tl.constexpr):
    """PyTorch's update in place: ``running = (1 - momentum) * running + momentum * batch``
    (``running_var`` takes ``var * unbias``, the unbiased variance); float32
    arithmetic (float64 for float64 buffers), on the device, no host sync."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rm = tl.load(rm_ptr + c, mask=cmask, other=0.0)
    rv = tl.load(rv_ptr + c, mask=cmask, other=0.0)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(rm.dtype)
    var = tl.load(var_ptr + c, mask=cmask, other=0.0).to(rv.dtype)
    tl.store(rm_ptr + c, rm * (1.0 - momentum) + mean * momentum, mask=cmask)
    tl.store(rv_ptr + c, rv * (1.0 - momentum) + var * (unbias * momentum), mask=cmask)
