"""The chunk scheduler of the CPU kernels: an atomic counter the threads claim
chunks of a pass from, inside the kernel call.

Part of :mod:`batchnorm.kernels.cpu._kernels`, which re-exports these names.
"""

# Numba's @intrinsic fixes the argument list of _fetch_add.
# ruff: noqa: ARG001

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

# A pass is cut into chunks; every thread that runs it (the caller, and pool
# threads once they wake) calls the same kernel with the same ``sched`` array
# ``[next, done, chunks, total]`` and takes chunks with an atomic counter
# until none is left, all without returning to Python (a chunk handed out in
# Python costs a dispatch and a GIL handover, ~2-5 us each). Chunk ``j``
# covers ``total * j // chunks`` to ``total * (j + 1) // chunks``; which thread
# takes it does not change the result (a reduction writes chunk ``j``'s
# partial to slot ``j``). The caller then spins (:func:`wait`) until the
# chunks other threads took are done; a thread that wakes after the last
# chunk was taken finds none and returns.

@intrinsic
def _fetch_add(typingctx, sched, index, value):
    """``sched[index] += value`` atomically (sequentially consistent); the old value."""
    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(array.data, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
    return types.int64(sched, types.intp, types.int64), codegen


@njit(inline="always")
def _claim(sched):
    """``(j, start, stop)``: the next chunk of the pass, or ``j = -1``."""
    j = _fetch_add(sched, 0, 1)
    chunks, total = sched[2], sched[3]
    if j >= chunks:
        return -1, 0, 0
    return j, total * j // chunks, total * (j + 1) // chunks


@njit(inline="always")
def _done(sched):
    _fetch_add(sched, 1, 1)


@njit(cache=True, nogil=True)
def wait(sched, spins):
    """Whether every chunk of the pass is done, spinning at most ``spins``
    times (the chunks other threads took end within one chunk's time, unless
    such a thread was descheduled: then the caller blocks instead)."""
    for _ in range(spins):
        if _fetch_add(sched, 1, 0) >= sched[2]:
            return True
    return False


def schedule(total: int, chunks: int) -> np.ndarray:
    """The ``sched`` array of a pass over ``range(total)`` in ``chunks`` chunks."""
    return np.array([0, 0, chunks, total], dtype=np.int64)


@njit(inline="always")
def schedule_jit(total, chunks):
    """:func:`schedule`, in compiled code."""
    sched = np.zeros(4, np.int64)
    sched[2] = chunks
    sched[3] = total
    return sched
