"""Module parity with ``torch.nn`` over a grid of shapes, dtypes, formats and options.

Each case runs two training steps and an eval step on ours and on PyTorch's
module side by side, comparing outputs, every gradient, the running
statistics and ``num_batches_tracked``.
"""

import itertools

import pytest
import torch
from helpers import TOL, assert_close, make_input, memory_format_for

import batchnorm
from batchnorm._backend import unavailable_reason

# Every backend that can run here: the portable path always, the fused CPU
# kernels when Numba is installed (the dev extra installs it).
BACKENDS = [b for b in ("torch", "cpu") if unavailable_reason(b, torch.empty(0)) is None]

SPATIAL = {2: [()], 3: [(1,), (7,)], 4: [(1, 1), (3, 5)], 5: [(1, 1, 1), (2, 3, 3)]}
CLASSES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def _shapes():
    for rank, N, C in itertools.product((2, 3, 4, 5), (2, 3, 16), (1, 3, 64, 65)):
        # Alternate the spatial size so every rank sees 1x1 and odd sizes.
        options = SPATIAL[rank]
        yield (N, C, *options[(N + C) % len(options)])


SHAPES = list(_shapes())
OPTIONS = list(itertools.product((True, False), (True, False), (0.1, None)))


def _cases():
    for shape in SHAPES:
        for dtype in TOL:
            formats = (False, True) if len(shape) in (4, 5) else (False,)
            for cl in formats:
                yield shape, dtype, cl


def _make_pair(shape, dtype, affine, track, momentum, backend="auto"):
    name = CLASSES[len(shape)]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    kw = dict(affine=affine, track_running_stats=track, momentum=momentum, dtype=param_dtype)
    ours = getattr(batchnorm, name)(shape[1], backend=backend, **kw)
    theirs = getattr(torch.nn, name)(shape[1], **kw)
    if affine:  # non-trivial parameters so their gradients matter
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
                m.bias.copy_(torch.linspace(-0.2, 0.2, shape[1]))
    return ours, theirs


def _step(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], dy)
    return y.detach(), grads


def _tolerances(dtype):
    rtol, atol = TOL[dtype]
    # Statistics are float32 for every input below float64.
    stats = (rtol, atol) if dtype in (torch.float32, torch.float64) else (1e-4, 1e-4)
    return dict(out=(rtol, atol), grad=(rtol, atol), stats=stats)


def _assert_no_worse_than_torch(ours, theirs, exact, atol, name):
    """Our error against float64 within 2x PyTorch's own (or within ``atol``)."""
    exact = exact.to(torch.float64)
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    our_err = (ours.double() - exact).abs().max().item() if exact.numel() else 0.0
    torch_err = (theirs.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert our_err <= max(2 * torch_err, atol * scale), (
        f"{name}: max error {our_err:.3g} vs float64, PyTorch's own {torch_err:.3g}")


@pytest.mark.parametrize("affine,track,momentum", OPTIONS)
@pytest.mark.parametrize("shape,dtype,channels_last", list(_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_torch_nn(backend, shape, dtype, channels_last, affine, track, momentum):
    fmt = memory_format_for(len(shape), channels_last)
    ours, theirs = _make_pair(shape, dtype, affine, track, momentum, backend)
    exact = _make_pair(shape, torch.float64, affine, track, momentum)[1]
    # Below float64, tensors are judged against a float64 run: tiny batches
    # (N=2, near-equal values) are ill-conditioned for any float32 kernel.
    low = dtype != torch.float64
    tol = _tolerances(dtype)
    for step, training in enumerate((True, True, False)):
        for m in (ours, theirs, exact):
            m.train(training)
        x = make_input(shape, dtype, fmt, seed=step, offset=step)
        dy = make_input(shape, dtype, fmt, seed=100 + step)
        y_ours, g_ours = _step(ours, x, dy)
        y_theirs, g_theirs = _step(theirs, x, dy)
        y_exact, g_exact = _step(exact, x.double(), dy.double()) if low else (None, [None] * 3)
        where = f"step {step} ({'train' if training else 'eval'})"
        assert y_ours.dtype == y_theirs.dtype
        assert y_ours.is_contiguous(memory_format=fmt), f"{where}: memory format lost"
        if low:
            _assert_no_worse_than_torch(y_ours, y_theirs, y_exact, tol["out"][1], f"{where} output")
        else:
            assert_close(y_ours, y_theirs, *tol["out"], name=f"{where} output")
        names = ("grad_input", "grad_weight", "grad_bias")
        for name, a, b, e in zip(names, g_ours, g_theirs, g_exact, strict=False):
            assert a.dtype == b.dtype
            if low:
                _assert_no_worse_than_torch(a, b, e, tol["grad"][1], f"{where} {name}")
                continue
            scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
            rtol, atol = tol["grad"]
            assert_close(a, b, rtol, atol * scale, name=f"{where} {name}")
        if track:
            assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
            assert_close(ours.running_mean, theirs.running_mean, *tol["stats"],
                         name=f"{where} running_mean")
            assert_close(ours.running_var, theirs.running_var, *tol["stats"],
                         name=f"{where} running_var")
        else:
            assert ours.running_mean is None and ours.num_batches_tracked is None
