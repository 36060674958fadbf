"""Compile every Triton kernel variant the backend launches for a GPU, without one.

``python scripts/check_triton_compiles.py`` (``tests/test_triton_backend.py``
runs it in a subprocess with ``TRITON_INTERPRET`` unset): the kernels in
``batchnorm.kernels.triton._kernels`` are swapped for recorders, the
backend's functions are driven on small CPU tensors over every dtype, layout,
activation, residual and mode, and each distinct launch (kernel, argument
types, compile-time constants) is compiled by Triton's real compiler for an
NVIDIA sm_90 target (PTX, then ``ptxas``). Nothing runs: this finds what the
interpreter cannot, e.g. code that does not type-check or does not lower.
Prints one line per variant and the count.
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton
from triton._utils import canonicalize_dtype
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import batchnorm.kernels.triton as tk
from batchnorm.kernels.triton import _kernels as K

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = ("stats_planar", "stats_rows", "finalize_stats", "prepare_affine", "apply",
           "grad_sums_planar", "grad_sums_rows", "finalize_grad", "grad_input",
           "update_running")
compiled: dict[tuple, object] = {}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + canonicalize_dtype(value.dtype)
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` compiles instead."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constexprs):
            names = self.jit_fn.arg_names
            signature = {n: _type(a) for n, a in zip(names, args, strict=False)}
            signature.update({n: "constexpr" for n in constexprs})
            # As Triton's launcher specialises: 16-byte aligned pointers and
            # integers that are multiples of 16 (the vectorised code paths).
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args)
                     if (isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0)
                     or (type(a) is int and a % 16 == 0 and a != 0)}
            key = (self.jit_fn.fn.__name__, tuple(signature.items()),
                   tuple(sorted(constexprs.items())), num_warps, tuple(attrs))
            if key not in compiled:
                src = ASTSource(self.jit_fn, signature, constexprs, attrs)
                compiled[key] = triton.compile(src, target=TARGET,
                                               options={"num_warps": num_warps})
                print(key[0], dict(sorted(constexprs.items())), flush=True)
        return launch


def drive():
    """Every path of the backend, on tensors that are never read."""
    def tensor(shape, dtype, layout):
        t = torch.zeros(shape, dtype=dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t

    # Sizes that are multiples of 16 (aligned: vectorised loads) with every
    # option, then odd sizes (scalar loads) with a few.
    for shape, dtype, layout in itertools.chain(
            itertools.product([(2, 16, 4, 8)], (torch.float32, torch.bfloat16, torch.float16),
                              ("planar", "nhwc")),
            itertools.product([(2, 3, 5, 7)], (torch.float32, torch.bfloat16),
                              ("planar", "nhwc"))):
        C = shape[1]
        acts = K.ACT if dtype == torch.float32 and C == 16 else (None, "relu", "silu")
        for act, res, training in itertools.product(acts, (False, True), (True, False)):
            x = tensor(shape, dtype, layout)
            r = tensor(shape, dtype, layout) if res else None
            w, b = torch.ones(C), torch.zeros(C)
            rm, rv = torch.zeros(C), torch.ones(C)
            out, saved, mean, var, invstd = tk.forward(x, rm, rv, w, b, r, training, 1e-5,
                                                       act, 0.01)
            tk.backward(out, x, mean, invstd, w, saved, act, 0.01, training,
                        (True, True, True, res))
            tk.backward(out, x, mean, invstd, None, saved, act, 0.01, training,
                        (True, False, False, False))
            if training:
                tk.update_running_stats(rm, rv, mean, var, 40, 0.1)
        x = tensor(shape, dtype, layout)
        mean, var = tk.batch_stats(x)
        invstd = torch.rsqrt(var + 1e-5)
        tk.normalize(x, mean, invstd, None, None, None, "relu", 0.01)
        sum_g, sum_gxc, g = tk.backward_reduce(x, x, mean, None, None, 0.01, True, True)
        tk.backward_elementwise(x, x, mean, invstd, None, sum_g, sum_gxc, 40, g=g)
    tk.INT64_FROM = 0  # the 64-bit offset variants
    for layout in ("planar", "nhwc"):
        x = tensor((2, 16, 4, 8), torch.bfloat16, layout)
        out, saved, mean, var, invstd = tk.forward(x, None, None, None, None, x, True, 1e-5,
                                                   "relu", 0.01)
        tk.backward(out, x, mean, invstd, None, saved, "relu", 0.01, True)


def main() -> int:
    tk.DEVICE_TYPE = "cpu"  # let CPU tensors through: nothing is launched
    for name in KERNELS:
        setattr(K, name, Recorder(getattr(K, name)))
    drive()
    print(f"compiled {len(compiled)} kernel variants for {TARGET.backend} sm_{TARGET.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
