"""Running a kernel pass on PyTorch's own threads.

A pass is compiled as a *trampoline*: a C function ``void f(void *block)``
(a Numba ``cfunc``, see ``_variants``) that reads its arrays from ``block``
(pointers and sizes, packed by :func:`launch`) and takes chunks of the pass
from the shared ``sched`` counter (``_schedule``) until none is left.

Where PyTorch runs on GNU-compatible OpenMP (Linux and macOS wheels: GNU
``libgomp`` or LLVM's ``libomp``, both export ``GOMP_parallel``), the pass
runs as an OpenMP parallel region of that runtime: the same threads PyTorch's
own operators use, already awake when a PyTorch operator ran just before
(waking our own threads costs 30-70 us a pass, a region ~1 us), never more
than ``torch.get_num_threads()`` of them, and no second runtime in the
process. Elsewhere (another threading backend, or a forked child, where the
parent's OpenMP threads do not exist and GNU OpenMP would wait for them
forever) the calling thread and a pool of ours run the same trampoline on
the same counter.

Numba's ``@intrinsic`` fixes the argument lists of the helpers below.
"""

# ruff: noqa: ARG001

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._schedule import schedule, wait

_VOIDP = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_TRAMPOLINE = ir.FunctionType(ir.VoidType(), [_VOIDP])
_GOMP_PARALLEL = ir.FunctionType(ir.VoidType(), [_TRAMPOLINE.as_pointer(), _VOIDP, _I32, _I32])


@intrinsic
def as_pointer(typingctx, address, dtype):
    """``address`` (an int64) as a pointer to ``dtype`` (a NumPy scalar type),
    for ``numba.carray``."""
    sig = types.CPointer(dtype.dtype)(types.int64, dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return sig, codegen


@intrinsic
def _call(typingctx, fn, data):
    """``fn(data)``: a trampoline on this thread."""
    def codegen(context, builder, signature, args):
        f = builder.inttoptr(args[0], _TRAMPOLINE.as_pointer())
        builder.call(f, [builder.inttoptr(args[1], _VOIDP)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64), codegen


@intrinsic
def _omp_parallel(typingctx, gomp, fn, data, threads):
    """``GOMP_parallel(fn, data, threads, 0)``: ``fn(data)`` on ``threads``
    threads of the OpenMP runtime, this one included; returns when all are done."""
    def codegen(context, builder, signature, args):
        g = builder.inttoptr(args[0], _GOMP_PARALLEL.as_pointer())
        f = builder.inttoptr(args[1], _TRAMPOLINE.as_pointer())
        builder.call(g, [f, builder.inttoptr(args[2], _VOIDP), builder.trunc(args[3], _I32),
                         ir.Constant(_I32, 0)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


@njit(inline="always")
def _put(block, i, a):
    block[3 + 2 * i] = a.ctypes.data
    block[4 + 2 * i] = a.shape[0]


@njit(cache=True, nogil=True)
def launch(gomp, fn, threads, dims, arrays):
    """Run trampoline ``fn`` on a block ``[d0, d1, d2, (pointer, len) per array]``
    (4 to 11 arrays): as an OpenMP region of ``threads`` threads when ``gomp``
    (the address of ``GOMP_parallel``) is set and ``threads > 1``, else on
    this thread."""
    n = len(arrays)  # a compile-time constant: the branches below are pruned
    block = np.empty(3 + 2 * n, np.int64)
    block[0] = dims[0]
    block[1] = dims[1]
    block[2] = dims[2]
    # Written out rather than a literal_unroll loop, which compiles ~2x slower.
    _put(block, 0, arrays[0])
    _put(block, 1, arrays[1])
    _put(block, 2, arrays[2])
    _put(block, 3, arrays[3])
    if n > 4:
        _put(block, 4, arrays[4])
        _put(block, 5, arrays[5])
        _put(block, 6, arrays[6])
        _put(block, 7, arrays[7])
    if n > 8:
        _put(block, 8, arrays[8])
    if n > 9:
        _put(block, 9, arrays[9])
        _put(block, 10, arrays[10])
    if gomp != 0 and threads > 1:
        _omp_parallel(gomp, fn, block.ctypes.data, threads)
    else:
        _call(fn, block.ctypes.data)
    # A use of ``block`` after the call: Numba frees an array after its last
    # use, and ``block.ctypes.data`` alone would let it go before the call.
    return block[0]


# ---------------------------------------------------------------- which threads

# Set to 0 to keep the passes off PyTorch's OpenMP threads (on our own pool).
ENV_VAR = "BATCHNORM_CPU_OPENMP"


def _find_gomp_parallel() -> int:
    """The address of ``GOMP_parallel`` in the OpenMP runtime PyTorch runs on,
    or 0 (PyTorch not on OpenMP, no such symbol loaded, or ENV_VAR=0)."""
    if os.environ.get(ENV_VAR, "").strip() == "0":
        return 0
    if not getattr(torch._C, "has_openmp", False):
        return 0
    try:
        fn = ctypes.CDLL(None).GOMP_parallel  # the runtime PyTorch loaded, process-wide
    except (AttributeError, OSError, TypeError):  # no such symbol; Windows: no CDLL(None)
        return 0
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


GOMP_PARALLEL = _find_gomp_parallel()
# The process that may use it: a forked child must not (its OpenMP runtime
# still counts the parent's threads).
_OMP_PID = os.getpid()


def use_openmp() -> bool:
    """Whether passes run as OpenMP regions here (else on our own pool)."""
    return GOMP_PARALLEL != 0 and os.getpid() == _OMP_PID


class _Pool:
    """Threads that run trampolines beside the caller where OpenMP cannot;
    rebuilt when PyTorch's thread count changes and in a forked child."""

    def __init__(self):
        self._lock = threading.Lock()
        self._executor = None
        self._key = None

    def executor(self, workers: int) -> ThreadPoolExecutor:
        key = (workers, os.getpid())
        with self._lock:
            if self._key != key:
                old, same_process = self._executor, self._key and self._key[1] == key[1]
                self._executor = ThreadPoolExecutor(workers, "batchnorm-cpu")
                self._key = key
                if old is not None and same_process:
                    old.shutdown(wait=False)
            return self._executor


POOL = _Pool()

# How long the caller spins for the pool's last chunks before it blocks
# (atomic reads, ~0.1-0.3 ms).
_SPINS = 1 << 14


def run(fn, dims, arrays, total: int, chunks: int) -> None:
    """Trampoline ``fn`` (a ``cfunc``) over ``range(total)`` cut into ``chunks``
    chunks, on up to ``torch.get_num_threads()`` threads; all done on return.
    ``arrays`` is the pass's arrays in the trampoline's order, without the
    ``sched`` counter, which is added here."""
    sched = schedule(total, chunks)
    arrays = (*arrays, sched)
    threads = min(torch.get_num_threads(), chunks)
    if threads <= 1 or use_openmp():
        launch(GOMP_PARALLEL, fn.address, threads, dims, arrays)
        return
    pool = POOL.executor(threads - 1)
    futures = [pool.submit(launch, 0, fn.address, 1, dims, arrays) for _ in range(threads - 1)]
    launch(0, fn.address, 1, dims, arrays)
    # The chunks the pool took end within one chunk's time (a pool thread that
    # wakes later finds none left and returns without touching the arrays);
    # if one does not, its thread was descheduled: block on it instead.
    if not wait(sched, _SPINS):
        for f in futures:
            f.result()
