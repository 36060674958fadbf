"""The fused CPU backend: batch norm in Numba kernels (``pip install batchnorm[cpu]``).

The same functions as :mod:`batchnorm.kernels.torch_ops` (see that module for
the contract), plus the fused :func:`forward` that the autograd function uses:
one parallel pass for the statistics and one for the output, with the
residual and the activation fused into it; a backward of one reduction pass
and one elementwise pass. bfloat16 and float16, types Numba lacks on the
CPU, reach the kernels as their bits; inputs of another layout (an arbitrary
permutation) or dtype run on the portable path, per call, with the same
results contract.

Threads: a pass over a large tensor is cut into chunks that threads take on
demand from an atomic counter, inside the compiled pass (``_schedule``).
Where PyTorch runs on OpenMP (its Linux and macOS wheels) the threads are
PyTorch's own: each pass is an OpenMP region of its runtime with
``torch.get_num_threads()`` threads (``_parallel``), so the two never
oversubscribe the machine, ``torch.set_num_threads`` governs both, and the
threads are awake when a PyTorch operator ran just before. Elsewhere, and in
a forked child, the calling thread and a pool of ours run the chunks (the
pool sleeps between calls). The forward and the backward are each one
compiled call (``_passes``) that runs its passes and the per-channel
arithmetic between them. Small tensors (below :data:`PARALLEL_MIN`
elements) run on the calling thread alone: waking a thread costs more than
it saves there.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch
from torch.autograd.graph import increment_version

from .. import torch_ops
from . import _kernels as K
from . import _parallel as P
from . import _passes
from . import _variants as V
from ._views import (  # noqa: F401 (DTYPES, runs_on: the backend's interface)
    DTYPES,
    _channel_array,
    _constants,
    _count,
    _dummy,
    _empty_like,
    _in_dtype,
    _np,
    _np_dtype,
    _param,
    _ranges,
    _stat_array,
    _View,
    _view,
    _widen,
    as_numpy,
    runs_on,
)

compute_dtype = torch_ops.compute_dtype


_FLOATS = (torch.float32, torch.float64)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's update, in place, as one fused call on both buffers:
    ``running += momentum * (batch - running)`` (``running_var`` takes the
    unbiased variance ``var * count / (count - 1)``); one kernel call for
    float32/float64 CPU buffers."""
    if (running_mean.dtype in _FLOATS and running_var.dtype in _FLOATS
            and mean.dtype in _FLOATS and var.dtype in _FLOATS
            and running_mean.is_cpu and running_var.is_cpu and mean.is_cpu and var.is_cpu):
        K.update_running(_channel_array(running_mean), _channel_array(running_var),
                         _np(mean), _np(var), count / (count - 1), float(momentum))
        # Written through NumPy: tell autograd the buffers changed, as an
        # in-place torch op would (a graph that saved them then refuses to run).
        increment_version((running_mean, running_var))
        return
    with torch.no_grad():
        torch._foreach_lerp_(
            (running_mean, running_var),
            (mean.to(running_mean.dtype), var.to(running_var.dtype) * (count / (count - 1))),
            momentum)


# Re-centre the shifted sums when the shift was this many standard deviations
# (squared) from the mean: below it float64 loses < 1e-10 relative.
_RECENTRE = 1e6
# The same for sums in float32 lanes (rows kernels): their error grows with
# (1 + shift^2 / var) * 2^-24 * K.ROWS_BLOCK, so the shift must be within a
# standard deviation of the mean.
_RECENTRE_F32 = 1.0


# Elements below which a pass runs on the calling thread only.
PARALLEL_MIN = 1 << 17


# Chunks per thread: chunks are handed out on demand, so a thread that starts
# late (a pool thread waking, an OpenMP thread descheduled) takes fewer.
_CHUNKS_PER_THREAD = 8
_CHUNK_MIN = 1 << 15  # elements


def _chunks(numel: int, ranges: int) -> int:
    """How many chunks a pass over ``numel`` elements (``ranges`` units) is cut into."""
    if numel < PARALLEL_MIN:
        return 1
    threads = torch.get_num_threads()
    if threads <= 1:
        return 1
    return max(1, min(ranges, threads * _CHUNKS_PER_THREAD, numel // _CHUNK_MIN))


def _reduce(v: _View, fn, arrays) -> np.ndarray:
    """The ``(P, 2, C)`` float64 partial sums of a reduction pass over ``v``:
    one per sample (planar) or per chunk (rows)."""
    total = _ranges(v)
    chunks = _chunks(v.numel, total)
    part = np.empty((v.shape[0] if v.planar else chunks, 2, v.shape[1]))
    P.run(fn, v.dims, (*arrays, part), total, chunks)
    return part


def _elementwise(v: _View, fn, arrays) -> None:
    total = _ranges(v)
    P.run(fn, v.dims, arrays, total, _chunks(v.numel, total))


def _stats(v: _View, xv: np.ndarray):
    """Float64 ``(mean, var)`` per channel: shifted sums around one value of the
    channel (planar, float64 sums) or a sample mean (rows, sums in the compute
    dtype, see K.ROWS_BLOCK), again around the mean found if that shift was
    too far off."""
    C = v.shape[1]
    m = v.numel // C
    fn = V.specialised("stats", v.planar, xv.dtype.type)
    if v.planar:
        recentre = _RECENTRE
        shift = _widen(xv[0, :, 0])
    else:
        ndt = np.float64 if xv.dtype == np.float64 else np.float32
        recentre = _RECENTRE if ndt is np.float64 else _RECENTRE_F32
        shift = np.empty(C, ndt)
        K.rows_shift(xv, shift)
    mean, var = np.empty(C), np.empty(C)
    if K.finalize_stats(_reduce(v, fn, (xv, shift)), shift, m, recentre, mean, var):
        shift = mean.astype(shift.dtype)
        K.finalize_stats(_reduce(v, fn, (xv, shift)), shift, m, np.inf, mean, var)
    return mean, var


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean (float64) and biased variance (compute dtype) of ``x``."""
    v = _view(x)
    if v is None:
        return torch_ops.batch_stats(x)
    mean, var = _stats(v, v.of(x))
    return torch.from_numpy(mean), torch.from_numpy(var).to(compute_dtype(x.dtype))


def _affine(mean, var, eps, weight, bias, ndt):
    """``(invstd, hi, scale, shift)`` in the compute dtype; see K.prepare_affine."""
    C = mean.shape[0]
    invstd, hi, scale, shift = (np.empty(C, ndt) for _ in range(4))
    K.prepare_affine(mean, var, eps, _param(weight, ndt), _param(bias, ndt), invstd, hi,
                     scale, shift)
    return invstd, hi, scale, shift


def _normalize(v, x, xv, hi, scale, shift, residual, activation, negative_slope):
    ndt = _np_dtype(x.dtype)
    out = _empty_like(x)
    save_pre = not K.saves_output(activation, negative_slope)
    # The pre-activation is kept in the compute dtype (as the portable path does).
    pre = _empty_like(x, dtype=compute_dtype(x.dtype)) if save_pre else None
    has_res = residual is not None
    fn = V.specialised("normalize", v.planar, K.ACT[activation], has_res, save_pre,
                       xv.dtype.type)
    args = (xv, hi, scale, shift, v.of(v.like(residual, x)) if has_res else xv,
            v.of(out), v.of(pre) if save_pre else _dummy(v, ndt),
            _constants(ndt, negative_slope))
    _elementwise(v, fn, args)
    act_saved = None if activation is None else (pre if save_pre else out)
    return out, act_saved


def normalize(x, mean, invstd, weight, bias, residual=None, activation=None,
              negative_slope=0.01):
    """``act(weight * (x - mean) * invstd + bias + residual)``; see torch_ops.normalize."""
    v = _view(x)
    if v is None:
        return torch_ops.normalize(x, mean, invstd, weight, bias, residual, activation,
                                   negative_slope)
    ndt = _np_dtype(x.dtype)
    m = mean.detach().double().numpy()
    inv = invstd.detach().numpy().astype(ndt)
    scale = inv * _param(weight, ndt) if weight is not None else inv
    hi = m.astype(ndt)
    shift = -(m - hi).astype(ndt) * scale
    if bias is not None:
        shift = shift + _param(bias, ndt)
    return _normalize(v, x, v.of(x), hi, np.ascontiguousarray(scale, ndt),
                      np.ascontiguousarray(shift, ndt), residual, activation, negative_slope)


def forward(x, running_mean, running_var, weight, bias, residual, training, eps,
            activation, negative_slope):
    """The whole forward: ``(out, act_saved, mean, var, invstd)``; see torch_ops.forward."""
    v = _view(x)
    if v is None:
        return torch_ops.forward(x, running_mean, running_var, weight, bias, residual,
                                 training, eps, activation, negative_slope)
    ndt = _np_dtype(x.dtype)
    xv = v.of(x)
    chunks = _chunks(v.numel, _ranges(v))
    if chunks == 1 or P.use_openmp():
        return _forward_compiled(v, x, xv, ndt, chunks, running_mean, running_var, weight, bias,
                                 residual, training, eps, activation, negative_slope)
    # Split across our own pool (no OpenMP to run on): the passes from here.
    if training:
        mean, var = _stats(v, xv)
    else:
        mean, var = _stat_array(running_mean), _stat_array(running_var)
    invstd, hi, scale, shift = _affine(mean, var, eps, weight, bias, ndt)
    out, act_saved = _normalize(v, x, xv, hi, scale, shift, residual, activation,
                                negative_slope)
    if training:
        mean_t, var_t = torch.from_numpy(mean), torch.from_numpy(var.astype(ndt))
    else:
        mean_t, var_t = _in_dtype(running_mean, x.dtype), _in_dtype(running_var, x.dtype)
    return out, act_saved, mean_t, var_t, torch.from_numpy(invstd)


class _ForwardPlan:
    """What a forward's signature (view, dtype, mode, epilogue) fixes: the
    compiled passes and the small arrays they take, made once (see _plan)."""

    __slots__ = ("stats_fn", "normalize_fn", "save_pre", "ndt", "cdtype", "k", "dummy",
                 "recentre", "shift_dtype")

    def __init__(self, v, dtype, training, activation, negative_slope, has_res):
        self.ndt = ndt = _np_dtype(dtype)
        self.cdtype = compute_dtype(dtype)
        storage = v.storage
        self.save_pre = not K.saves_output(activation, negative_slope)
        self.normalize_fn = V.specialised("normalize", v.planar, K.ACT[activation], has_res,
                                          self.save_pre, storage).address
        self.stats_fn = V.specialised("stats", v.planar, storage).address if training else 0
        self.recentre = _RECENTRE_F32 if training and not v.planar and ndt is np.float32 \
            else _RECENTRE
        # The statistics' shift: float64 for the planar sums, the compute dtype for rows.
        self.shift_dtype = np.float64 if v.planar else ndt
        self.k = _constants(ndt, negative_slope)
        self.dummy = _dummy(v, ndt)


def _plan(cls, key):
    """The plan of class ``cls`` for ``key`` (whose first item is the view), made once."""
    plan = _PLANS.get(key)
    return _new_plan(cls, key) if plan is None else plan


def _new_plan(cls, key):
    # Making a plan compiles kernels: torch.compile must run it as it is, not
    # trace it. torch.compile has imported torch._dynamo; importing it here
    # just to say so (torch.compiler.disable does) would cost every process ~1 s.
    if "torch._dynamo" in sys.modules:
        return _untraced(_make_plan)(cls, key)
    return _make_plan(cls, key)


def _make_plan(cls, key):
    if len(_PLANS) >= 1024:
        _PLANS.clear()
    plan = _PLANS[key] = cls(*key)
    return plan


@functools.cache
def _untraced(fn):
    return torch.compiler.disable(fn)


_PLANS: dict[tuple, object] = {}


def _forward_compiled(v, x, xv, ndt, chunks, running_mean, running_var, weight, bias, residual,
                      training, eps, activation, negative_slope):
    """:func:`forward` as one compiled call (see _passes.forward): the passes on
    PyTorch's OpenMP threads, or on this thread for a small input."""
    has_res = residual is not None
    p = _plan(_ForwardPlan, (v, x.dtype, bool(training), activation, negative_slope, has_res))
    C = v.shape[1]
    if training:
        mean, var = np.empty(C), np.empty(C)
    else:
        mean, var = _stat_array(running_mean), _stat_array(running_var)
    shift = np.empty(C, p.shift_dtype)
    invstd, hi, scale, offset = np.empty((4, C), ndt)
    out = _empty_like(x)
    pre = _empty_like(x, dtype=p.cdtype) if p.save_pre else None
    _passes.forward(P.GOMP_PARALLEL, min(torch.get_num_threads(), chunks), chunks, p.stats_fn,
                    p.normalize_fn, v.dims, xv, v.of(v.like(residual, x)) if has_res else xv,
                    v.of(out), v.of(pre) if p.save_pre else p.dummy, p.k, eps,
                    _param(weight, ndt), _param(bias, ndt), bool(training), p.recentre,
                    shift, mean, var, invstd, hi, scale, offset)
    act_saved = None if activation is None else (pre if p.save_pre else out)
    if training:
        mean_t, var_t = torch.from_numpy(mean), torch.from_numpy(var.astype(ndt))
    else:
        mean_t, var_t = _in_dtype(running_mean, x.dtype), _in_dtype(running_var, x.dtype)
    return out, act_saved, mean_t, var_t, torch.from_numpy(invstd)


# ---------------------------------------------------------------- backward

class _Grad:
    """The arrays both backward passes read, in the kernels' view."""

    def __init__(self, v, grad_out, x, mean, act_saved, activation, negative_slope):
        self.v = v
        self.ndt = _np_dtype(x.dtype)
        self.x = x
        self.dy = v.of(v.like(grad_out, x))
        self.xv = v.of(x)
        self.code = K.ACT[activation]
        # Without an activation the kernels never read ``a``; dy stands in.
        self.a = v.of(v.like(act_saved, x)) if activation is not None else self.dy
        self.k = _constants(self.ndt, negative_slope)
        m = mean.detach().double().numpy()
        self.hi = m.astype(self.ndt)
        self.lo = m - self.hi  # float64

    def sums(self, keep_g):
        """``(part, g)``: the ``(P, 2, C)`` partial sums of ``g`` and
        ``g * (x - hi)``, and the full-size ``g`` when ``keep_g``."""
        v = self.v
        g = _empty_like(self.x) if keep_g else None
        fn = V.specialised("grad_sums", v.planar, self.code, keep_g, self.xv.dtype.type,
                           self.a.dtype.type)
        part = _reduce(v, fn, (self.dy, self.xv, self.a, self.hi, self.k,
                               v.of(g) if keep_g else self.dy))
        return part, g

    def coefficients(self, part, invstd, weight, count, training):
        """``(sum_g, sum_gxc, kx, c0, scale)``, float64, from the partial sums."""
        C = self.v.shape[1]
        out = [np.empty(C) for _ in range(5)]
        K.finalize_grad(part, self.lo, invstd.detach().numpy(), _param(weight, self.ndt),
                        count, training, *out[:2], *out[2:])
        return out

    def grad_input(self, kx, c0, scale, training, g=None):
        ndt, v = self.ndt, self.v
        dx = _empty_like(self.x)
        use_g = g is not None
        fn = V.specialised("grad_input", v.planar, self.code, use_g, bool(training),
                           self.xv.dtype.type, self.a.dtype.type)
        _elementwise(v, fn, (self.dy, self.xv, self.a, self.hi, self.k,
                             v.of(g) if use_g else self.dy, kx.astype(ndt),
                             c0.astype(ndt), scale.astype(ndt), v.of(dx)))
        return dx


def backward(grad_out, x, mean, invstd, weight, act_saved=None, activation=None,
             negative_slope=0.01, training=True, needs_input_grad=(True, True, True, True)):
    """Analytic backward; see torch_ops.backward."""
    v = _view(x)
    if v is None:
        return torch_ops.backward(grad_out, x, mean, invstd, weight, act_saved, activation,
                                  negative_slope, training, needs_input_grad)
    need_x, need_w, need_b, need_r = needs_input_grad
    chunks = _chunks(v.numel, _ranges(v))
    if chunks == 1 or P.use_openmp():
        return _backward_compiled(v, chunks, grad_out, x, mean, invstd, weight, act_saved,
                                  activation, negative_slope, training, needs_input_grad)
    # Split across our own pool (no OpenMP to run on): the passes from here.
    grad = _Grad(v, grad_out, x, mean, act_saved, activation, negative_slope)
    part, g = grad.sums(keep_g=need_r)
    sum_g, sum_gxc, kx, c0, scale = grad.coefficients(part, invstd, weight, _count(x),
                                                      training)
    # A bfloat16/float16 g is rounded: dx is computed from dy instead, in float32.
    g_in = g if x.dtype == compute_dtype(x.dtype) else None
    grad_input = grad.grad_input(kx, c0, scale, training, g_in) if need_x else None
    cdtype = invstd.dtype
    grad_weight = (torch.from_numpy(sum_gxc * invstd.detach().double().numpy()).to(cdtype)
                   if need_w else None)
    grad_bias = torch.from_numpy(sum_g).to(cdtype) if need_b else None
    return grad_input, grad_weight, grad_bias, (g if need_r else None)


class _BackwardPlan:
    """What a backward's signature fixes (see _ForwardPlan)."""

    __slots__ = ("sums_fn", "input_fn", "use_g", "ndt", "k")

    def __init__(self, v, dtype, a_storage, activation, negative_slope, training, need_x,
                 need_r):
        self.ndt = _np_dtype(dtype)
        code = K.ACT[activation]
        # A bfloat16/float16 g is rounded: dx is computed from dy instead, in float32.
        self.use_g = need_r and dtype == compute_dtype(dtype)
        self.sums_fn = V.specialised("grad_sums", v.planar, code, need_r, v.storage,
                                     a_storage).address
        self.input_fn = (V.specialised("grad_input", v.planar, code, self.use_g, training,
                                       v.storage, a_storage).address if need_x else 0)
        self.k = _constants(self.ndt, negative_slope)


def _backward_compiled(v, chunks, grad_out, x, mean, invstd, weight, act_saved, activation,
                       negative_slope, training, needs_input_grad):
    """:func:`backward` as one compiled call (see _passes.backward)."""
    need_x, need_w, need_b, need_r = needs_input_grad
    dy = v.of(v.like(grad_out, x))
    a = v.of(v.like(act_saved, x)) if activation is not None else dy  # unread without one
    p = _plan(_BackwardPlan, (v, x.dtype, a.dtype.type, activation, negative_slope,
                              bool(training), bool(need_x), bool(need_r)))
    g = _empty_like(x) if need_r else None
    gv = v.of(g) if need_r else dy
    C = v.shape[1]
    # Allocated by torch, as before the plans: they reach users as .grad.
    grad_w, grad_b = torch.empty(C, dtype=invstd.dtype), torch.empty(C, dtype=invstd.dtype)
    dx = _empty_like(x) if need_x else None
    _passes.backward(P.GOMP_PARALLEL, min(torch.get_num_threads(), chunks), chunks,
                     p.sums_fn, p.input_fn, v.dims, dy, v.of(x), a, gv, gv if p.use_g else dy,
                     v.of(dx) if need_x else dy, _np(mean), _np(invstd),
                     _param(weight, p.ndt), p.k, _count(x), bool(training),
                     as_numpy(grad_w, (C,)), as_numpy(grad_b, (C,)))
    return dx, grad_w if need_w else None, grad_b if need_b else None, g


def backward_reduce(grad_out, x, mean, act_saved=None, activation=None, negative_slope=0.01,
                    need_gxc=True, keep_g=False):
    """The per-channel sums of this ``x`` alone; see torch_ops.backward_reduce."""
    v = _view(x)
    if v is None:
        return torch_ops.backward_reduce(grad_out, x, mean, act_saved, activation,
                                         negative_slope, need_gxc, keep_g)
    grad = _Grad(v, grad_out, x, mean, act_saved, activation, negative_slope)
    part, g = grad.sums(keep_g)
    sums = part.sum(axis=0)
    cdtype = compute_dtype(x.dtype)
    sum_gxc = sums[1] - grad.lo * sums[0]
    return (torch.from_numpy(sums[0]).to(cdtype),
            torch.from_numpy(sum_gxc).to(cdtype) if need_gxc else None, g)


def backward_elementwise(grad_out, x, mean, invstd, weight, sum_g, sum_gxc, count,
                         act_saved=None, activation=None, negative_slope=0.01, training=True,
                         g=None):
    """``grad_input`` from given per-channel sums; see torch_ops.backward_elementwise."""
    v = _view(x)
    if v is None:
        return torch_ops.backward_elementwise(grad_out, x, mean, invstd, weight, sum_g,
                                              sum_gxc, count, act_saved, activation,
                                              negative_slope, training, g)
    grad = _Grad(v, grad_out, x, mean, act_saved, activation, negative_slope)
    C = x.shape[1]
    kx, c0, scale = (np.empty(C) for _ in range(3))
    empty = np.empty(0)
    K.grad_coeffs(sum_g.detach().double().numpy() if training else empty,
                  sum_gxc.detach().double().numpy() if training else empty, grad.lo,
                  invstd.detach().numpy(), _param(weight, grad.ndt), count, training, kx, c0,
                  scale)
    if g is not None and x.dtype != compute_dtype(x.dtype):
        g = None  # rounded to 16 bits: recomputed from dy in float32 instead
    return grad.grad_input(kx, c0, scale, training, None if g is None else v.like(g, x))


