"""Test helpers shared by every test file: inputs, shapes, tolerances, comparison."""

from __future__ import annotations

import numpy as np
import torch

# Awkward cases on purpose: C=1, primes, N=2 with L=1, 1x1 spatial, odd sizes.
SHAPES = [
    (2, 1),
    (3, 3),
    (16, 65),
    (2, 3, 1),
    (3, 65, 7),
    (16, 1, 5),
    (2, 3, 1, 1),
    (3, 64, 5, 7),
    (16, 1, 3, 3),
    (2, 65, 4, 4),
    (2, 3, 1, 1, 1),
    (3, 65, 2, 3, 5),
]

# (rtol, atol) against the float64 reference or torch.nn, per input dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}
DTYPES = list(TOL)


def memory_format_for(ndim: int, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


def make_input(shape, dtype=torch.float32, memory_format=torch.contiguous_format, seed=0,
               scale=1.0, offset=0.0, requires_grad=False):
    """A reproducible random tensor; per-channel offsets so statistics differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    if len(shape) >= 2 and shape[1] > 0:
        channel_shift = torch.linspace(-1.0, 1.0, shape[1], dtype=torch.float64)
        x = x + channel_shift.view(1, -1, *([1] * (len(shape) - 2))) * scale
    x = x.to(dtype).contiguous(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def assert_close(actual, expected, rtol, atol, name="tensor"):
    """``torch.testing.assert_close`` with the worst index and NaN mismatches spelled out."""
    a = torch.as_tensor(np.asarray(actual) if isinstance(actual, np.ndarray) else actual)
    e = torch.as_tensor(np.asarray(expected) if isinstance(expected, np.ndarray) else expected)
    a = a.detach().to("cpu", torch.float64)
    e = e.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a ^ nan_e).nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN mismatch at {idx}: got {a[tuple(idx)]}, "
                             f"expected {e[tuple(idx)]}")
    ok = ~nan_a
    err = (a - e).abs().where(ok, torch.zeros_like(a))
    bound = atol + rtol * e.abs().where(ok, torch.zeros_like(e))
    excess = err - bound
    if a.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in np.unravel_index(int(excess.argmax()), tuple(a.shape)))
        raise AssertionError(
            f"{name}: worst mismatch at index {idx}: got {a[idx].item():.10g}, expected "
            f"{e[idx].item():.10g} (abs err {err[idx].item():.3g} > atol {atol} + rtol {rtol} "
            f"* |expected|); {(excess > 0).sum().item()} of {a.numel()} elements out of "
            "tolerance")
