"""bfloat16 and float16 in the CPU kernels: ``ld`` / ``st`` and the conversions.

Part of :mod:`batchnorm.kernels.cpu._kernels`, which re-exports these names.
"""

# Numba's @intrinsic and @overload fix the argument lists of the 16-bit helpers.
# ruff: noqa: ARG001, ARG005

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic, overload

# Numba has no bfloat16 and no CPU float16 (its float16 type has no data model
# there): both reach the kernels as their 16 bits, told apart by the integer
# type of the view (BF16_BITS, HALF_BITS; see ``batchnorm.kernels.cpu._View``),
# so every kernel is compiled per storage type as for float32/float64. ``ld``
# widens a stored value to the compute type, ``st`` narrows a computed value
# to an array's element type; both are plain casts for float32/float64 arrays.
#
# * bfloat16 -> float32 is the bits shifted into the top half of a float32;
#   float32 -> bfloat16 rounds to nearest even, as PyTorch's conversion (NaN
#   stays a quiet NaN). Integer ops that vectorize.
# * float16 <-> float32 is LLVM's ``fpext``/``fptrunc`` on ``half`` where the
#   target has F16C (``vcvtph2ps``/``vcvtps2ph``, 8 or 16 lanes: 6-9x faster
#   than the integer conversion below, which LLVM vectorizes in 64-bit lanes),
#   else integer ops (an ``fptrunc`` without F16C is a libcall the JIT may not
#   resolve). Both are exact: subnormals, +-0 and Inf kept, round to nearest
#   even on store with overflow to Inf; a NaN stays a NaN (quieted, the top of
#   its payload kept, as F16C and PyTorch's vectorized conversion do).

BF16_BITS = np.uint16
HALF_BITS = np.int16


@intrinsic
def _bits_as_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _half_fpext(typingctx, bits):
    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], llvm_ir.HalfType())
        return builder.fpext(half, llvm_ir.FloatType())
    return types.float32(types.int16), codegen


@intrinsic
def _half_fptrunc(typingctx, value):
    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], llvm_ir.HalfType())
        return builder.bitcast(half, llvm_ir.IntType(16))
    return types.int16(types.float32), codegen


_U = np.uint32


@njit(inline="always")
def half_to_f32_int(bits):
    """float16 bits (int16) -> float32 in integer ops (see the section comment)."""
    h = _U(bits) & _U(0xFFFF)
    em = h & _U(0x7FFF)
    normal = (em << _U(13)) + _U((127 - 15) << 23)  # exponent rebased
    quiet = _U(0x400000) if em > _U(0x7C00) else _U(0)
    special = (em << _U(13)) | _U(0x7F800000) | quiet  # Inf, NaN (quieted)
    tiny = _f32_as_bits(np.float32(em) * np.float32(2.0 ** -24))  # 0, subnormal: exact
    f = tiny if em < _U(0x400) else (special if em >= _U(0x7C00) else normal)
    return _bits_as_f32(f | ((h & _U(0x8000)) << _U(16)))


@njit(inline="always")
def f32_to_half_int(value):
    """float32 -> float16 bits (int16), nearest even, in integer ops (see the
    section comment); no float arithmetic, so ``reassoc`` cannot touch it."""
    bits = _f32_as_bits(np.float32(value))
    sign = (bits >> _U(16)) & _U(0x8000)
    a = bits & _U(0x7FFFFFFF)
    # |value| >= 65536: Inf, or NaN (quieted)
    special = (_U(0x7E00) | ((a >> _U(13)) & _U(0x3FF))) if a > _U(0x7F800000) else _U(0x7C00)
    # a normal half, or rounded up to Inf
    normal = (a - _U((127 - 15) << 23) + _U(0xFFF) + ((a >> _U(13)) & _U(1))) >> _U(13)
    # subnormal or zero: the 24-bit significand shifted right by 14..25
    sh = _U(max(np.int32(14), min(np.int32(126) - np.int32(a >> _U(23)), np.int32(25))))
    m = (a & _U(0x7FFFFF)) | _U(0x800000)
    tiny = (m + ((_U(1) << (sh - _U(1))) - _U(1)) + ((m >> sh) & _U(1))) >> sh
    o = special if a >= _U(0x47800000) else (normal if a >= _U(0x38800000) else tiny)
    return np.int16(o | sign)


@functools.cache
def _target_has_f16c() -> bool:
    """Whether Numba compiles for a CPU with F16C (its target's features,
    ``NUMBA_CPU_FEATURES`` included; the disk cache is keyed on them too)."""
    from numba.core import codegen, config

    features = config.CPU_FEATURES
    if features is None:
        features = codegen.get_host_cpu_features()
    return "+f16c" in features.split(",")


def ld(value):
    """A stored element as the compute type (see the section comment)."""


def st(value, array):
    """``value`` as ``array``'s element type (see the section comment)."""


@overload(ld, inline="always")
def _ld(value):
    if value == types.uint16:  # bfloat16
        return lambda value: _bits_as_f32(np.uint32(value) << np.uint32(16))
    if value == types.int16:  # float16
        if _target_has_f16c():
            return lambda value: _half_fpext(value)
        return lambda value: half_to_f32_int(value)
    return lambda value: value


@overload(st, inline="always")
def _st(value, array):
    if array.dtype == types.uint16:  # bfloat16
        def to_bf16(value, array):
            v = np.float32(value)
            if v != v:
                return np.uint16(0x7FC0)
            bits = _f32_as_bits(v)
            bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return np.uint16(bits >> np.uint32(16))
        return to_bf16
    if array.dtype == types.int16:  # float16
        if _target_has_f16c():
            return lambda value, array: _half_fptrunc(np.float32(value))
        return lambda value, array: f32_to_half_int(value)
    return lambda value, array: value
