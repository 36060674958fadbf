"""The Triton backend: batch norm in fused GPU kernels (``pip install 'batchnorm[triton]'``).

The same functions as :mod:`batchnorm.kernels.torch_ops` (see that module for
the contract). A training forward is three launches: the split statistics
(:func:`_kernels.stats_planar` / ``stats_rows``), their merge
(``finalize_stats``), and the apply pass with the residual and activation
fused (``apply``); eval is two (``prepare_affine``, ``apply``); the backward
is three (``grad_sums_*``, ``finalize_grad``, ``grad_input``). Per-channel
values stay on the device and nothing waits for the host: no ``.item()``,
no synchronisation, so a step can be captured in a CUDA graph.

Runs on CUDA tensors of dtype float32, float16 and bfloat16 in the planar
(contiguous NCHW, NCL, NCDHW) and rows (channels_last, channels_last_3d,
``(N, C)``) layouts; anything else (float64, another permutation, an empty
batch) takes the portable path for that call.

**Without a GPU** the kernels run in Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before this module is imported; the test suite
uses that to check the kernels' logic on small shapes. It is far too slow for
anything else, so ``backend="auto"`` never picks it.

**torch.compile**: while Dynamo traces, the forward, the backward and the
running-statistics update go through the custom ops ``batchnorm::triton_forward``,
``batchnorm::triton_backward`` and ``batchnorm::triton_update_running_stats``
(registered with ``torch.library``, with shape-only fake implementations),
so the graph calls our kernels as opaque ops; eager calls skip the
dispatcher.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .. import torch_ops
from . import _kernels as K

compute_dtype = torch_ops.compute_dtype

# Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at
# import): then they run on CPU tensors, else on CUDA tensors.
_knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable
INTERPRETED = (bool(_knobs.runtime.interpret) if _knobs is not None else
               os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
DEVICE_TYPE = "cpu" if INTERPRETED else "cuda"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Bytes of input per tile: a program's working set per loop step. 8 KiB keeps
# 16 elements per thread at 4 warps for 32-bit data (vector loads, few
# registers). The interpreter gets small tiles, so the test suite's small
# shapes still run the multi-tile, multi-slice paths.
TILE_BYTES = 256 if INTERPRETED else 8192
# Elements from which offsets are computed in int64 (below, int32 is exact).
INT64_FROM = 2**31
# How the elementwise kernels address a planar (NCHW) tensor: "unaligned" walks
# it flat, the channel computed per element, when its rows of H*W elements do
# not start on 16-byte boundaries (14x14, 7x7: else one element per load
# instruction), and in (n, c) row tiles otherwise; "always" / "never" force
# one way (for measuring which is faster on a GPU).
PLANAR_FLAT = "unaligned"
# Programs a reduction aims for: a few waves of the GPU's multiprocessors.
WAVES = 4
_INTERPRETER_SMS = 2


def reason_unavailable(x: torch.Tensor) -> str | None:
    """Why these kernels cannot run on ``x``'s device, or ``None``."""
    if x.device.type == DEVICE_TYPE:
        return None
    if x.device.type == "cpu":
        return ("the Triton backend runs on CUDA tensors; on CPU tensors only in Triton's "
                "interpreter, with TRITON_INTERPRET=1 set before batchnorm's Triton kernels "
                "are first imported")
    if INTERPRETED:
        return (f"the Triton backend was imported with TRITON_INTERPRET=1 (CPU tensors "
                f"only), got a tensor on {x.device}")
    return f"the Triton backend runs on CUDA tensors, got a tensor on {x.device}"


class _View:
    """How the kernels address ``x``: planar ``(N, C, L)`` or rows ``(M, C)``.

    ``R, K, ch_on_rows``: the same memory as an ``(R, K)`` row-major matrix
    for the elementwise kernels.
    """

    __slots__ = ("planar", "N", "C", "L", "M", "numel", "big")

    def __init__(self, planar, N, C, L):
        self.planar, self.N, self.C, self.L = planar, N, C, L
        self.M = N * L
        self.numel = N * C * L
        self.big = self.numel >= INT64_FROM

    @property
    def matrix(self):
        if self.planar:
            return self.N * self.C, self.L, True
        return self.M, self.C, False


def _view(x: torch.Tensor) -> _View | None:
    """How the kernels see ``x``, or ``None`` when they cannot (the portable path runs)."""
    if x.dtype not in DTYPES or x.device.type != DEVICE_TYPE or x.numel() == 0:
        return None
    N, C = x.shape[0], x.shape[1]
    L = x.numel() // (N * C)
    if x.is_contiguous():
        return _View(L > 1, N, C, L)
    if x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return _View(False, N, C, L)
    return None


def runs_on(x: torch.Tensor) -> bool:
    """Whether these kernels run on ``x`` (else its calls take the portable path)."""
    return _view(x) is not None


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (its dtype kept) with ``x``'s layout; a copy only when it differs."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


# ---------------------------------------------------------------- launch configs

@functools.cache
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _warps(tile: int) -> int:
    return 8 if tile >= 4096 else 4


@functools.lru_cache(maxsize=4096)
def _reduce_config(planar: bool, N: int, C: int, L: int, esize: int, sms: int,
                   tile_bytes: int):
    """Tiling of a split reduction: ``(blocks, S, per_prog, extra)``.

    Planar: one channel per program row, its ``(N, L)`` plane cut into
    ``BLOCK_N x BLOCK_L`` tiles, ``per_prog`` tiles per program. Rows:
    ``BLOCK_C`` channels per program, ``per_prog`` rows per program. ``S``
    slices per channel, enough programs for ``WAVES`` waves of the GPU.
    """
    tile = max(16, tile_bytes // esize)
    target = WAVES * sms
    if planar:
        BL = min(_pow2(L), tile)
        BN = max(1, min(_pow2(N), tile // BL))
        tiles_l = triton.cdiv(L, BL)
        tiles = triton.cdiv(N, BN) * tiles_l
        S = min(tiles, max(1, triton.cdiv(target, C)))
        per = triton.cdiv(tiles, S)
        return dict(BLOCK_N=BN, BLOCK_L=BL), triton.cdiv(tiles, per), per, (tiles_l, tiles)
    M = N * L
    BC = min(_pow2(C), 64, tile)
    BM = max(1, min(_pow2(M), tile // BC))
    tiles = triton.cdiv(M, BM)
    S = min(tiles, max(1, triton.cdiv(target, triton.cdiv(C, BC))))
    per = triton.cdiv(tiles, S) * BM
    return dict(BLOCK_M=BM, BLOCK_C=BC), triton.cdiv(M, per), per, None


@functools.lru_cache(maxsize=4096)
def _elementwise_config(R: int, Kd: int, esize: int, tile_bytes: int):
    """``BLOCK_R x BLOCK_K`` tiles of an ``(R, K)`` matrix, ``BLOCK_K`` along the
    contiguous axis."""
    tile = max(16, tile_bytes // esize)
    BK = min(_pow2(Kd), tile)
    BR = max(1, min(_pow2(R), tile // BK))
    return BR, BK


def _channel_block(C: int) -> int:
    return min(_pow2(C), 1024)


def _flat(v: _View, esize: int) -> bool:
    """Whether the elementwise kernels index a planar tensor flat (see
    :data:`PLANAR_FLAT`)."""
    if not v.planar or PLANAR_FLAT == "never":
        return False
    return PLANAR_FLAT == "always" or (v.L * esize) % 16 != 0


def _matrix_launch(kernel, v: _View, x: torch.Tensor, *args, **meta):
    """Launch an elementwise kernel over ``v``'s ``(R, K)`` matrix."""
    R, Kd, on_rows = v.matrix
    esize = x.element_size()
    flat = _flat(v, esize)
    if flat:
        BR, BK = 1, max(16, TILE_BYTES // esize)
        grid = (triton.cdiv(R * Kd, BK), 1)
    else:
        BR, BK = _elementwise_config(R, Kd, esize, TILE_BYTES)
        grid = (triton.cdiv(R, BR), triton.cdiv(Kd, BK))
    kernel[grid](*args[:-1], R, Kd, v.C, args[-1], CH_ON_ROWS=on_rows, FLAT=flat, BLOCK_R=BR,
                 BLOCK_K=BK, BIG=v.big, num_warps=_warps(BR * BK), **meta)


# ---------------------------------------------------------------- forward

def _slope(activation, negative_slope) -> float:
    return float(negative_slope) if activation == "leaky_relu" else 0.0


def _stats(v: _View, x: torch.Tensor):
    """``(part, S, hi)``: the ``(3, S, C)`` partials and the per-channel shift."""
    C = v.C
    blocks, S, per, extra = _reduce_config(v.planar, v.N, C, v.L, x.element_size(),
                                           _sms(x.device), TILE_BYTES)
    part = torch.empty(3, S, C, dtype=torch.float32, device=x.device)
    hi = torch.empty(C, dtype=torch.float32, device=x.device)
    if v.planar:
        tiles_l, tiles = extra
        K.stats_planar[(C, S)](x, hi, part, v.N, C, v.L, C * v.L, tiles_l, per, tiles,
                               BIG=v.big, num_warps=_warps(blocks["BLOCK_N"] *
                                                           blocks["BLOCK_L"]), **blocks)
    else:
        grid = (triton.cdiv(C, blocks["BLOCK_C"]), S)
        K.stats_rows[grid](x, hi, part, v.M, C, per, BIG=v.big,
                           num_warps=_warps(blocks["BLOCK_M"] * blocks["BLOCK_C"]), **blocks)
    return part, S, hi


def _normalize(v, x, hi, scale, shift, residual, activation, negative_slope):
    out = torch.empty_like(x)
    save_pre = not torch_ops.saves_output(activation, negative_slope)
    pre = torch.empty_like(x, dtype=torch.float32) if save_pre else out
    res = _like(residual, x) if residual is not None else x
    _matrix_launch(K.apply, v, x, x, res, out, pre, hi, scale, shift,
                   _slope(activation, negative_slope), ACT=K.ACT[activation],
                   HAS_RES=residual is not None, SAVE_PRE=save_pre)
    act_saved = None if activation is None else (pre if save_pre else out)
    return out, act_saved


def _forward(v, x, running_mean, running_var, weight, bias, residual, training, eps,
             activation, negative_slope):
    C, dev = v.C, x.device
    f32 = dict(dtype=torch.float32, device=dev)
    hi, scale, shift = torch.empty(3, C, **f32)
    invstd = torch.empty(C, **f32)
    w = weight if weight is not None else invstd  # a stand-in pointer, never read
    b = bias if bias is not None else invstd
    grid = (triton.cdiv(C, _channel_block(C)),)
    if training:
        part, S, hi = _stats(v, x)
        mean = torch.empty(C, dtype=torch.float64, device=dev)
        var = torch.empty(C, **f32)
        K.finalize_stats[grid](part, S, C, eps, hi, w, b, mean, var, invstd, scale, shift,
                               HAS_W=weight is not None, HAS_B=bias is not None,
                               BLOCK_C=_channel_block(C))
    else:
        K.prepare_affine[grid](running_mean, running_var, w, b, C, eps, hi, invstd, scale,
                               shift, FROM_VAR=True, HAS_W=weight is not None,
                               HAS_B=bias is not None, BLOCK_C=_channel_block(C))
        mean = running_mean.to(torch.float32, copy=True)
        var = running_var.to(torch.float32, copy=True)
    out, act_saved = _normalize(v, x, hi, scale, shift, residual, activation, negative_slope)
    return out, act_saved, mean, var, invstd


def forward(x, running_mean, running_var, weight, bias, residual, training, eps,
            activation, negative_slope):
    """The whole forward: ``(out, act_saved, mean, var, invstd)``; see torch_ops.forward."""
    v = _view(x)
    if v is None:
        return torch_ops.forward(x, running_mean, running_var, weight, bias, residual,
                                 training, eps, activation, negative_slope)
    if torch.compiler.is_compiling():
        out, pre, mean, var, invstd = torch.ops.batchnorm.triton_forward(
            x, running_mean, running_var, weight, bias, residual, training, eps, activation,
            negative_slope)
        act_saved = None if activation is None else (pre if pre.numel() else out)
        return out, act_saved, mean, var, invstd
    return _forward(v, x, running_mean, running_var, weight, bias, residual, training, eps,
                    activation, negative_slope)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean (float64 ``hi + lo``) and biased variance (float32) of ``x``."""
    v = _view(x)
    if v is None:
        return torch_ops.batch_stats(x)
    C = v.C
    part, S, hi = _stats(v, x)
    mean = torch.empty(C, dtype=torch.float64, device=x.device)
    var, invstd, scale, shift = torch.empty(4, C, dtype=torch.float32, device=x.device)
    K.finalize_stats[(triton.cdiv(C, _channel_block(C)),)](
        part, S, C, 1e-5, hi, hi, hi, mean, var, invstd, scale, shift, HAS_W=False,
        HAS_B=False, BLOCK_C=_channel_block(C))
    return mean, var


def normalize(x, mean, invstd, weight, bias, residual=None, activation=None,
              negative_slope=0.01):
    """``act(weight * (x - mean) * invstd + bias + residual)``; see torch_ops.normalize."""
    v = _view(x)
    if v is None:
        return torch_ops.normalize(x, mean, invstd, weight, bias, residual, activation,
                                   negative_slope)
    C = v.C
    hi, scale, shift = torch.empty(3, C, dtype=torch.float32, device=x.device)
    K.prepare_affine[(triton.cdiv(C, _channel_block(C)),)](
        mean, mean, weight if weight is not None else hi, bias if bias is not None else hi,
        C, 0.0, hi, invstd, scale, shift, FROM_VAR=False, HAS_W=weight is not None,
        HAS_B=bias is not None, BLOCK_C=_channel_block(C))
    return _normalize(v, x, hi, scale, shift, residual, activation, negative_slope)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update, in place, in one launch on the device; see torch_ops."""
    if (running_mean.device.type != DEVICE_TYPE or running_mean.dtype == torch.float64
            or not (running_mean.is_contiguous() and running_var.is_contiguous())):
        return torch_ops.update_running_stats(running_mean, running_var, mean, var, count,
                                              momentum)
    if torch.compiler.is_compiling():
        return torch.ops.batchnorm.triton_update_running_stats(
            running_mean, running_var, mean, var, count, float(momentum))
    return _update_running_stats(running_mean, running_var, mean, var, count, momentum)


def _update_running_stats(running_mean, running_var, mean, var, count, momentum):
    C = running_mean.numel()
    with torch.no_grad():
        K.update_running[(triton.cdiv(C, _channel_block(C)),)](
            running_mean, running_var, mean, var, C, float(momentum), count / (count - 1),
            BLOCK_C=_channel_block(C))


# ---------------------------------------------------------------- backward

class _Grad:
    """What both backward passes read: ``dy`` and the saved activation in ``x``'s
    layout, the activation's code and slope."""

    def __init__(self, v, grad_out, x, act_saved, activation, negative_slope):
        self.v, self.x = v, x
        self.dy = _like(grad_out, x)
        self.a = _like(act_saved, x) if activation is not None else self.dy
        self.act = K.ACT[activation]
        self.slope = _slope(activation, negative_slope)

    def sums(self, mean, keep_g):
        """``(part, S, g)``: the ``(2, S, C)`` partial sums and, when ``keep_g``,
        the full-size ``g`` (the residual's gradient, ``x``'s dtype)."""
        v, x = self.v, self.x
        C = v.C
        blocks, S, per, extra = _reduce_config(v.planar, v.N, C, v.L, x.element_size(),
                                               _sms(x.device), TILE_BYTES)
        part = torch.empty(2, S, C, dtype=torch.float32, device=x.device)
        g = torch.empty_like(x) if keep_g else self.dy
        meta = dict(ACT=self.act, KEEP_G=keep_g, BIG=v.big, **blocks)
        if v.planar:
            tiles_l, tiles = extra
            K.grad_sums_planar[(C, S)](self.dy, x, self.a, g, mean, part, v.N, C, v.L,
                                       C * v.L, tiles_l, per, tiles, self.slope,
                                       num_warps=_warps(blocks["BLOCK_N"] * blocks["BLOCK_L"]),
                                       **meta)
        else:
            grid = (triton.cdiv(C, blocks["BLOCK_C"]), S)
            K.grad_sums_rows[grid](self.dy, x, self.a, g, mean, part, v.M, C, per, self.slope,
                                   num_warps=_warps(blocks["BLOCK_M"] * blocks["BLOCK_C"]),
                                   **meta)
        return part, S, (g if keep_g else None)

    def finalize(self, part, S, sums, mean, invstd, weight, count, training, mode, coef):
        C = self.v.C
        K.finalize_grad[(triton.cdiv(C, _channel_block(C)),)](
            part, S, sums, mean, invstd, weight if weight is not None else invstd,
            coef if coef is not None else invstd, C, 1.0 / max(count, 1), SUMS=mode,
            COEF=coef is not None, TRAINING=bool(training), HAS_W=weight is not None,
            BLOCK_C=_channel_block(C))

    def grad_input(self, mean, coef, training, g=None):
        x = self.x
        dx = torch.empty_like(x)
        use_g = g is not None
        _matrix_launch(K.grad_input, self.v, x, self.dy, x, self.a,
                       g if use_g else self.dy, mean, coef, dx, self.slope, ACT=self.act,
                       USE_G=use_g, TRAINING=bool(training))
        return dx


def _backward(v, grad_out, x, mean, invstd, weight, act_saved, activation, negative_slope,
              training, needs_input_grad):
    need_x, need_w, need_b, need_r = needs_input_grad
    C, dev = v.C, x.device
    grad = _Grad(v, grad_out, x, act_saved, activation, negative_slope)
    need_sums = need_w or need_b or (need_x and training)
    coef = torch.empty(3, C, dtype=torch.float32, device=dev) if need_x else None
    sums = torch.empty(3, C, dtype=torch.float32, device=dev)
    g = None
    if need_sums or need_r:
        part, S, g = grad.sums(mean, keep_g=need_r)
        grad.finalize(part, S, sums, mean, invstd, weight, _count(x), training, 1, coef)
    elif need_x:  # eval, only grad_input: its scale
        grad.finalize(sums, 0, sums, mean, invstd, weight, _count(x), training, 0, coef)
    # A low-precision g is rounded: grad_input recomputes it from dy in float32.
    use_g = g if x.dtype == torch.float32 else None
    grad_input = grad.grad_input(mean, coef, training, use_g) if need_x else None
    grad_weight = sums[2] if need_w else None
    grad_bias = sums[0] if need_b else None
    return grad_input, grad_weight, grad_bias, (g if need_r else None)


def backward(grad_out, x, mean, invstd, weight, act_saved=None, activation=None,
             negative_slope=0.01, training=True, needs_input_grad=(True, True, True, True)):
    """Analytic backward; see torch_ops.backward."""
    v = _view(x)
    if v is None:
        return torch_ops.backward(grad_out, x, mean, invstd, weight, act_saved, activation,
                                  negative_slope, training, needs_input_grad)
    if torch.compiler.is_compiling():
        grads = torch.ops.batchnorm.triton_backward(
            grad_out, x, mean, invstd, weight, act_saved, activation, negative_slope,
            training, list(needs_input_grad))
        return tuple(t if need else None for t, need in zip(grads, needs_input_grad,
                                                            strict=True))
    return _backward(v, grad_out, x, mean, invstd, weight, act_saved, activation,
                     negative_slope, training, needs_input_grad)


def backward_reduce(grad_out, x, mean, act_saved=None, activation=None, negative_slope=0.01,
                    need_gxc=True, keep_g=False):
    """The per-channel sums of this ``x`` alone; see torch_ops.backward_reduce."""
    v = _view(x)
    if v is None:
        return torch_ops.backward_reduce(grad_out, x, mean, act_saved, activation,
                                         negative_slope, need_gxc, keep_g)
    grad = _Grad(v, grad_out, x, act_saved, activation, negative_slope)
    part, S, g = grad.sums(mean, keep_g)
    sums = torch.empty(3, v.C, dtype=torch.float32, device=x.device)
    ones = torch.ones(v.C, dtype=torch.float32, device=x.device)
    grad.finalize(part, S, sums, mean, ones, None, 1, True, 1, None)
    return sums[0], (sums[1] if need_gxc else None), g


def backward_elementwise(grad_out, x, mean, invstd, weight, sum_g, sum_gxc, count,
                         act_saved=None, activation=None, negative_slope=0.01, training=True,
                         g=None):
    """``grad_input`` from given per-channel sums; see torch_ops.backward_elementwise."""
    v = _view(x)
    if v is None:
        return torch_ops.backward_elementwise(grad_out, x, mean, invstd, weight, sum_g,
                                              sum_gxc, count, act_saved, activation,
                                              negative_slope, training, g)
    grad = _Grad(v, grad_out, x, act_saved, activation, negative_slope)
    C = v.C
    coef = torch.empty(3, C, dtype=torch.float32, device=x.device)
    sums = torch.zeros(2, C, dtype=torch.float32, device=x.device)
    if training:
        sums[0].copy_(sum_g)
        sums[1].copy_(sum_gxc)
    grad.finalize(sums, 0, sums, mean, invstd, weight, count, training, 2 if training else 0,
                  coef)
    if g is not None and x.dtype != torch.float32:
        g = None  # rounded to low precision: recomputed from dy in float32 instead
    return grad.grad_input(mean, coef, training, None if g is None else _like(g, x))


def _count(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0


# ---------------------------------------------------------------- torch.library

@torch.library.custom_op("batchnorm::triton_forward", mutates_args=())
def _forward_op(x: torch.Tensor, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, weight: torch.Tensor | None,
                bias: torch.Tensor | None, residual: torch.Tensor | None, training: bool,
                eps: float, activation: str | None, negative_slope: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, act_saved, mean, var, invstd = _forward(
        _view(x), x, running_mean, running_var, weight, bias, residual, training, eps,
        activation, negative_slope)
    # Outputs may not alias each other: the saved output travels as an empty tensor.
    pre = act_saved if act_saved is not None and act_saved is not out else x.new_empty(0)
    return out, pre, mean, var, invstd


@_forward_op.register_fake
def _(x, running_mean, running_var, weight, bias, residual, training, eps,  # noqa: ARG001
      activation, negative_slope):
    C = x.shape[1]
    save_pre = not torch_ops.saves_output(activation, negative_slope)
    pre = torch.empty_like(x, dtype=torch.float32) if save_pre else x.new_empty(0)
    mean_dtype = torch.float64 if training else torch.float32
    return (torch.empty_like(x), pre, x.new_empty(C, dtype=mean_dtype),
            x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32))


@torch.library.custom_op("batchnorm::triton_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                 invstd: torch.Tensor, weight: torch.Tensor | None,
                 act_saved: torch.Tensor | None, activation: str | None,
                 negative_slope: float, training: bool, needs_input_grad: list[bool]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _backward(_view(x), grad_out, x, mean, invstd, weight, act_saved, activation,
                      negative_slope, training, tuple(needs_input_grad))
    # Unwanted gradients travel as empty tensors; grad_weight and grad_bias are
    # rows of one buffer, copied out (outputs of a custom op may not alias).
    return tuple(x.new_empty(0) if t is None else t.clone() if t.dim() == 1 else t
                 for t in grads)


@_backward_op.register_fake
def _(grad_out, x, mean, invstd, weight, act_saved, activation,  # noqa: ARG001
      negative_slope, training, needs_input_grad):  # noqa: ARG001
    C = x.shape[1]
    need_x, need_w, need_b, need_r = needs_input_grad

    def pick(need, t):
        return t if need else x.new_empty(0)

    return (pick(need_x, torch.empty_like(x)),
            pick(need_w, x.new_empty(C, dtype=torch.float32)),
            pick(need_b, x.new_empty(C, dtype=torch.float32)),
            pick(need_r, torch.empty_like(x)))


@torch.library.custom_op("batchnorm::triton_update_running_stats",
                         mutates_args=("running_mean", "running_var"))
def _update_op(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
               var: torch.Tensor, count: int, momentum: float) -> None:
    _update_running_stats(running_mean, running_var, mean, var, count, momentum)


@_update_op.register_fake
def _(running_mean, running_var, mean, var, count, momentum):  # noqa: ARG001
    return None


__all__ = ["DTYPES", "INTERPRETED", "backward", "backward_elementwise", "backward_reduce",
           "batch_stats", "forward", "normalize", "reason_unavailable", "runs_on",
           "update_running_stats"]
