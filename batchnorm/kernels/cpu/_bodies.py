"""The bodies of the CPU kernels' passes: normalize (with the residual and
the activation), the gradient sums, and ``grad_input``, for both layouts.

Each is inlined into its compiled variants (``_variants``) with the
activation code and the flags as compile-time constants, and takes chunks of
the pass from ``sched`` until none is left (``_schedule``). Part of
:mod:`batchnorm.kernels.cpu`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._bits import ld, st
from ._kernels import ROWS_BLOCK, _act, _act_grad, _flush
from ._schedule import _claim, _done


@njit(inline="always")
def _normalize_planar(x, hi, scale, shift, res, out, pre, kk, code, has_res, save_pre, sched):
    N, C, L = x.shape
    j, start, stop = _claim(sched)
    while j >= 0:
        for n in range(start // C, (stop + C - 1) // C):
            for c in range(max(start - n * C, 0), min(stop - n * C, C)):
                h, s, t = hi[c], scale[c], shift[c]
                xr, orow = x[n, c], out[n, c]
                rr = res[n, c] if has_res else xr
                for i in range(L):
                    z = (ld(xr[i]) - h) * s + t
                    if has_res:
                        z += ld(rr[i])
                    if save_pre:
                        pre[n, c, i] = z
                    orow[i] = st(_act(z, code, kk), orow)
        _done(sched)
        j, start, stop = _claim(sched)


@njit(inline="always")
def _normalize_rows(x, hi, scale, shift, res, out, pre, kk, code, has_res, save_pre, sched):
    C = x.shape[1]
    h, s, t = hi.copy(), scale.copy(), shift.copy()  # alias nothing
    j, start, stop = _claim(sched)
    while j >= 0:
        for r in range(start, stop):
            xr, orow = x[r], out[r]
            rr = res[r] if has_res else xr
            for c in range(C):
                z = (ld(xr[c]) - h[c]) * s[c] + t[c]
                if has_res:
                    z += ld(rr[c])
                if save_pre:
                    pre[r, c] = z
                orow[c] = st(_act(z, code, kk), orow)
        _done(sched)
        j, start, stop = _claim(sched)


@njit(inline="always")
def _gx(dr, ar, gr, xr, c, hc, code, keep_g, kk):
    """``(g, g * (x - hi))`` of one element, ``g = dy * act'(.)``; ``g`` stored
    when ``keep_g``."""
    gv = _act_grad(ld(dr[c]), ld(ar[c]), code, kk)
    if keep_g:
        gr[c] = st(gv, gr)
    return gv, gv * (ld(xr[c]) - hc)




@njit(inline="always")
def _grad_sums_planar(dy, x, a, hi, kk, g, out, sched, code, keep_g):
    """Float64 ``(sum(g), sum(g * (x - hi)))`` per run, ``g = dy * act'(.)``,
    written to ``g`` when ``keep_g``."""
    N, C, L = x.shape
    j, start, stop = _claim(sched)
    while j >= 0:
        for n in range(start // C, (stop + C - 1) // C):
            for c in range(max(start - n * C, 0), min(stop - n * C, C)):
                h = hi[c]
                dr, xr, ar = dy[n, c], x[n, c], a[n, c]
                gr = g[n, c] if keep_g else dr
                s1 = 0.0
                s2 = 0.0
                for i in range(L):
                    gv = _act_grad(ld(dr[i]), ld(ar[i]), code, kk)
                    if keep_g:
                        gr[i] = st(gv, gr)
                    s1 += np.float64(gv)
                    s2 += np.float64(gv) * np.float64(ld(xr[i]) - h)
                out[n, 0, c] = s1
                out[n, 1, c] = s2
        _done(sched)
        j, start, stop = _claim(sched)


@njit(inline="always")
def _grad_sums_rows(dy, x, a, hi, kk, g, out, sched, code, keep_g):
    """The same per chunk of rows, summed in the compute dtype by blocks of
    ROWS_BLOCK rows (as :func:`shifted_sums_rows`)."""
    C = x.shape[1]
    s1 = np.empty(C)  # this call's own arrays, as in shifted_sums_rows
    s2 = np.empty(C)
    h = hi.copy()
    a1 = np.zeros_like(h)
    a2 = np.zeros_like(h)
    j, r, stop = _claim(sched)
    while j >= 0:
        s1[:] = 0.0
        s2[:] = 0.0
        while r < stop:
            r1 = min(r + ROWS_BLOCK, stop)
            while r < r1:
                dr, xr, ar = dy[r], x[r], a[r]
                gr = g[r] if keep_g else dr
                for c in range(C):
                    u, v = _gx(dr, ar, gr, xr, c, h[c], code, keep_g, kk)
                    a1[c] += u
                    a2[c] += v
                r += 1
            _flush(a1, a2, s1, s2)
        out[j, 0, :] = s1
        out[j, 1, :] = s2
        _done(sched)
        j, r, stop = _claim(sched)


@njit(inline="always")
def _grad_input_planar(dy, x, a, hi, kk, g, kx, c0, scale, dx, sched, code, use_g, training):
    """``dx = kx * (x - hi) + c0 + scale * g`` (training) or ``scale * g`` (eval),
    ``g`` read when ``use_g``, else recomputed from ``dy``."""
    N, C, L = x.shape
    j, start, stop = _claim(sched)
    while j >= 0:
        for n in range(start // C, (stop + C - 1) // C):
            for c in range(max(start - n * C, 0), min(stop - n * C, C)):
                h, s, kc, cc = hi[c], scale[c], kx[c], c0[c]
                dr, xr, dxr, ar = dy[n, c], x[n, c], dx[n, c], a[n, c]
                gr = g[n, c] if use_g else dr
                for i in range(L):
                    gv = ld(gr[i]) if use_g else _act_grad(ld(dr[i]), ld(ar[i]), code, kk)
                    if training:
                        dxr[i] = st(kc * (ld(xr[i]) - h) + cc + s * gv, dxr)
                    else:
                        dxr[i] = st(s * gv, dxr)
        _done(sched)
        j, start, stop = _claim(sched)


@njit(inline="always")
def _grad_input_rows(dy, x, a, hi, kk, g, kx, c0, scale, dx, sched, code, use_g, training):
    """:func:`_grad_input_planar` over rows."""
    C = x.shape[1]
    hi, kx, c0, scale = hi.copy(), kx.copy(), c0.copy(), scale.copy()  # alias nothing
    j, start, stop = _claim(sched)
    while j >= 0:
        for r in range(start, stop):
            dr, xr, dxr, ar = dy[r], x[r], dx[r], a[r]
            gr = g[r] if use_g else dr
            for c in range(C):
                gv = ld(gr[c]) if use_g else _act_grad(ld(dr[c]), ld(ar[c]), code, kk)
                if training:
                    dxr[c] = st(kx[c] * (ld(xr[c]) - hi[c]) + c0[c] + scale[c] * gv, dxr)
                else:
                    dxr[c] = st(scale[c] * gv, dxr)
        _done(sched)
        j, start, stop = _claim(sched)
