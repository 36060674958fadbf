"""The fused CPU backend (Numba): what the shared parity suites cannot see.

``test_functional.py`` and ``nn/test_parity.py`` run every case on this
backend too (against ``batchnorm.reference`` and ``torch.nn``); here: the
resolver, the layouts the kernels take and the ones they hand to the portable
path, large offsets and outlier shifts, thread counts, and the disk cache.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_close, make_input

from batchnorm import _backend, reference
from batchnorm.functional import ACTIVATIONS, batch_norm
from batchnorm.kernels import torch_ops

pytest.importorskip("numba", reason="the fused CPU backend needs Numba (pip install "
                    "'batchnorm[cpu]')")

from batchnorm.kernels import cpu  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-10)


def _run(x, activation=None, residual=None, training=True, backend="cpu", slope=0.01):
    """Output, every gradient and the running statistics of one call."""
    C = x.shape[1]
    x = x.detach().requires_grad_()  # keeps x's strides, whatever they are
    w = torch.linspace(0.5, 1.5, C, dtype=x.dtype if x.dtype == torch.float64 else
                       torch.float32).requires_grad_()
    b = torch.linspace(-0.3, 0.3, C, dtype=w.dtype).requires_grad_()
    r = None if residual is None else residual.detach().clone().requires_grad_()
    rm, rv = torch.zeros(C, dtype=w.dtype), torch.full((C,), 2.0, dtype=w.dtype)
    y = batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation=activation,
                   negative_slope=slope, residual=r, backend=backend)
    dy = make_input(x.shape, x.dtype, seed=9).contiguous(
        memory_format=_format_of(x))
    inputs = [x, w, b] + ([r] if r is not None else [])
    grads = torch.autograd.grad(y, inputs, dy)
    return [y.detach(), *grads, rm, rv]


def _format_of(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------- resolver

def test_auto_picks_the_cpu_kernels_for_cpu_tensors():
    assert _backend.resolve_backend("auto", torch.empty(2, 3)) is cpu


def test_without_numba_auto_falls_back_and_cpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(_backend, "_NUMBA", False)
    x = torch.randn(4, 3)
    assert _backend.resolve_backend("auto", x) is torch_ops
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run: .*Numba.*batchnorm\[cpu\]"):
        batch_norm(x, None, None, training=True, backend="cpu")


def test_cpu_backend_on_another_device_says_why():
    x = torch.empty(4, 3, device="meta")
    assert "CPU tensors" in _backend.unavailable_reason("cpu", x)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("shape,fmt,kind", [
    ((4, 3), torch.contiguous_format, "rows"),
    ((4, 3, 1, 1), torch.contiguous_format, "rows"),
    ((4, 3, 5), torch.contiguous_format, "planar"),
    ((4, 3, 5, 2), torch.contiguous_format, "planar"),
    ((4, 3, 5, 2), torch.channels_last, "rows"),
    ((2, 3, 2, 2, 2), torch.channels_last_3d, "rows"),
])
def test_kernels_see_contiguous_and_channels_last_inputs_without_a_copy(shape, fmt, kind):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    v = cpu._view(x)
    assert v.kind == kind
    assert np.shares_memory(v.of(x), x.numpy())


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 4, 5, 6).permute(0, 2, 1, 3),  # neither NCHW nor NHWC
    lambda: torch.randn(4, 6, 8)[:, ::2],                 # a strided slice
    lambda: torch.randn(4, 3, 1).expand(4, 3, 5),         # a broadcast (stride 0)
])
def test_other_layouts_and_dtypes_run_on_the_portable_path_with_the_same_results(make):
    x = make()
    assert cpu._view(x) is None
    got, want = _run(x), _run(x, backend="torch")
    for a, b in zip(got[:-2], want[:-2], strict=True):  # output and gradients
        assert torch.equal(a, b)
    # The running statistics go through this backend's own (fused) update.
    for a, b in zip(got[-2:], want[-2:], strict=True):
        assert_close(a, b, 1e-6, 1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fmt", ["planar", "rows", "flat"])
def test_every_epilogue_in_both_layouts_matches_the_reference(activation, fmt):
    shape = {"planar": (3, 5, 4, 3), "rows": (3, 5, 4, 3), "flat": (7, 5)}[fmt]
    memory = torch.channels_last if fmt == "rows" else torch.contiguous_format
    x = make_input(shape, torch.float64, memory, seed=1, scale=2.0, offset=0.5)
    res = make_input(shape, torch.float64, memory, seed=2)
    y, gx, gw, gb, gr, rm, rv = _run(x, activation, res, slope=-0.3 if activation else 0.01)
    kw = dict(residual=res.numpy(), activation=activation, negative_slope=-0.3)
    w = np.linspace(0.5, 1.5, 5)
    b = np.linspace(-0.3, 0.3, 5)
    out, cache = reference.forward_train(x.numpy(), w, b, **kw)
    dy = make_input(shape, torch.float64, seed=9).numpy()
    assert_close(y, out, **F64, name="out")
    for got, want, name in zip((gx, gw, gb, gr), reference.backward(dy, cache),
                               ("grad_input", "grad_weight", "grad_bias", "grad_residual"),
                               strict=True):
        assert_close(got, want, **F64, name=name)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_users_tensors_stay_resizable(fmt, dtype):
    # The kernels see tensors through NumPy; ``Tensor.numpy()`` would mark each
    # one as never resizable again, which PyTorch's batch norm does not do.
    import batchnorm

    m = batchnorm.BatchNorm2d(3, activation="relu", backend="cpu")
    x = make_input((4, 3, 5, 5), dtype, fmt, seed=9, requires_grad=True)
    res = make_input((4, 3, 5, 5), dtype, fmt, seed=10, requires_grad=True)
    y = m(x, res)
    y.square().sum().backward()
    touched = {"input": x, "residual": res, "output": y, "input grad": x.grad,
               "residual grad": res.grad, "weight": m.weight, "weight grad": m.weight.grad,
               "bias grad": m.bias.grad, "running_mean": m.running_mean,
               "running_var": m.running_var}
    fixed = [name for name, t in touched.items() if not t.untyped_storage().resizable()]
    assert not fixed, f"marked not resizable: {fixed}"
    x.data.resize_(2, 3)  # what failed: "Trying to resize storage that is not resizable"


# ---------------------------------------------------------------- accuracy

@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_large_offset_small_spread_keeps_float32_accuracy(layout):
    x = (torch.randn(8, 4, 6, 6, dtype=torch.float64) * 1e-2 + 1e4)
    ours = _run(x.float().contiguous(memory_format=layout))
    exact = _run(x.float().double().contiguous(memory_format=layout))
    torch_bn = torch.nn.BatchNorm2d(4)
    want = torch_bn(x.float())
    # Within 2x PyTorch's own error against the float64 run of the same input.
    torch_err = (want.double() - exact[0]).abs().max().item()
    assert (ours[0].double() - exact[0]).abs().max().item() <= 2 * torch_err + 1e-6
    assert_close(ours[1], exact[1], 1e-3, 1e-3, name="grad_input")


def test_an_outlier_as_the_shift_is_recentred():
    # The shifted sums start from one value of each channel; here that value is
    # 1e6 standard deviations away, and the statistics are taken again.
    x = torch.randn(64, 2, 16, dtype=torch.float64) * 1e-3
    x[0, :, 0] = 1e3
    mean, var = cpu.batch_stats(x)
    want_var, want_mean = torch.var_mean(x, dim=(0, 2), correction=0)
    assert_close(mean, want_mean, 1e-12, 0, name="mean")
    assert_close(var, want_var, 1e-10, 0, name="var")


def test_nan_and_inf_propagate_like_torch():
    x = torch.randn(4, 3, 5)
    x[1, 0, 2] = float("nan")
    x[2, 1, 1] = float("inf")
    ours = batch_norm(x, None, None, training=True, activation="relu", backend="cpu")
    theirs = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))


# ---------------------------------------------------------------- threads

@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "own-pool"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_thread_count_follows_torch_and_does_not_change_results(fmt, openmp, monkeypatch):
    if openmp and not cpu.P.use_openmp():
        pytest.skip("PyTorch here does not run on GNU-compatible OpenMP")
    if not openmp:
        monkeypatch.setattr(cpu.P, "GOMP_PARALLEL", 0)  # as where PyTorch has no OpenMP
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)  # split even this small input
    monkeypatch.setattr(cpu, "_CHUNK_MIN", 64)
    x = make_input((16, 8, 12, 12), torch.float64, fmt, seed=4)
    before = torch.get_num_threads()
    seen = []  # (chunks, threads, OpenMP) of every pass or compiled forward/backward
    real_launch = cpu.P.launch

    def launch_spy(gomp, fn, threads, dims, arrays):
        seen.append((arrays[-1][2], threads, gomp != 0))
        return real_launch(gomp, fn, threads, dims, arrays)

    def spying(real):
        def spy(gomp, threads, chunks, *args):
            seen.append((chunks, threads, gomp != 0))
            return real(gomp, threads, chunks, *args)
        return spy

    monkeypatch.setattr(cpu.P, "launch", launch_spy)
    monkeypatch.setattr(cpu._passes, "forward", spying(cpu._passes.forward))
    monkeypatch.setattr(cpu._passes, "backward", spying(cpu._passes.backward))
    try:
        torch.set_num_threads(1)
        one = _run(x, "relu")
        assert seen and {(c, t) for c, t, _ in seen} == {(1, 1)}  # no split, no pool
        seen.clear()
        torch.set_num_threads(3)
        many = _run(x, "relu")
        assert seen and all(c > 3 for c, _, _ in seen)
        if openmp:  # OpenMP regions of torch's thread count
            assert {(t, omp) for _, t, omp in seen} == {(3, True)}
        else:  # the caller plus 2 pool threads, each running the pass on its own
            assert {(t, omp) for _, t, omp in seen} == {(1, False)}
            assert cpu.P.POOL._key[0] == 2
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        assert_close(a, b, 1e-13, 1e-13)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's Linux wheels")
def test_the_kernels_find_pytorchs_openmp_runtime_unless_told_not_to():
    # PyTorch's Linux wheels run on GNU OpenMP: the passes must use it (else
    # they would silently fall back to our own pool), and BATCHNORM_CPU_OPENMP=0
    # keeps them off it.
    if not torch._C.has_openmp:
        pytest.skip("this PyTorch build has no OpenMP")
    assert cpu.P.GOMP_PARALLEL != 0 and cpu.P.use_openmp()
    code = ("from batchnorm.kernels.cpu import _parallel as P; "
            "print(P.GOMP_PARALLEL, P.use_openmp())")
    env = {**__import__("os").environ, cpu.P.ENV_VAR: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["0", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_the_kernels_start_no_threads_beside_torchs():
    # With PyTorch on OpenMP the passes run on its threads: once PyTorch's
    # pool exists, a large batch norm adds no thread to the process.
    if not cpu.P.use_openmp():
        pytest.skip("PyTorch here does not run on GNU-compatible OpenMP")
    import os

    x = torch.randn(32, 16, 32, 32, requires_grad=True)
    (x * 2).sum()  # PyTorch's OpenMP threads exist from here
    threads = set(os.listdir("/proc/self/task"))
    batch_norm(x, None, None, training=True, activation="relu", backend="cpu").sum().backward()
    assert set(os.listdir("/proc/self/task")) <= threads  # none new (an old one may end)


def test_a_thread_that_starts_after_the_pass_touches_nothing():
    # Chunks are taken inside the pass from a shared counter; a thread that
    # starts once all are taken must return without writing.
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    fn = cpu.V.specialised("normalize", False, cpu.K.ACT["relu"], False, False, np.float32)
    one = np.ones(6, np.float32)
    out = np.empty_like(x)
    sched = cpu.K.schedule(40, 5)
    arrays = (x, one, one, one, x, out, x, cpu.K.constants(np.float32, 0.01), sched)
    cpu.P.launch(0, fn.address, 1, (40, 6, 1), arrays)
    assert cpu.K.wait(sched, 1)
    assert np.array_equal(out, np.maximum((x - 1) + 1, 0))
    out[:] = -7.0
    cpu.P.launch(0, fn.address, 1, (40, 6, 1), arrays)  # a late thread: nothing left to take
    assert (out == -7.0).all()


def test_a_forked_child_gets_its_own_threads():
    import multiprocessing as mp

    x = torch.randn(64, 8, 32, 32)
    want = batch_norm(x, None, None, training=True, backend="cpu")  # the pool exists now
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_batch_norm, (x,)).get(timeout=120)
    assert np.array_equal(got, want.numpy())


def _child_batch_norm(x):
    # Sent back as NumPy: pickling a tensor copies it with PyTorch's OpenMP,
    # which hangs in a forked child once the parent has used it (GNU OpenMP).
    return batch_norm(x, None, None, training=True, backend="cpu").numpy()


# ---------------------------------------------------------------- disk cache

def test_a_training_step_does_not_import_torch_dynamo():
    # torch._dynamo takes ~1 s to import; only torch.compile should pay it.
    code = textwrap.dedent("""
        import sys, torch, batchnorm
        m = batchnorm.BatchNorm2d(3, activation="relu", backend="cpu")
        m(torch.randn(4, 3, 5, 5, requires_grad=True)).sum().backward()
        m.eval()(torch.randn(4, 3, 5, 5))
        assert "torch._dynamo" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_compiled_kernels_are_loaded_from_the_disk_cache_by_a_new_process():
    code = textwrap.dedent("""
        import torch, batchnorm
        x = torch.randn(4, 3, 5, requires_grad=True)
        batchnorm.BatchNorm1d(3, activation="relu")(x).sum().backward()
        x = torch.randn(4, 3, 5, 2).contiguous(memory_format=torch.channels_last)
        batchnorm.BatchNorm2d(3, activation="silu")(x.requires_grad_()).sum().backward()
        from batchnorm.kernels.cpu import _variants as V
        cfuncs = [f for f in V._SPECIALISED.values() if not hasattr(f, "stats")]
        jits = [f for f in V._SPECIALISED.values() if hasattr(f, "stats")]
        hits = (sum(f.cache_hits for f in cfuncs)
                + sum(sum(f.stats.cache_hits.values()) for f in jits))
        misses = (sum(f.cache_hits == 0 for f in cfuncs)
                  + sum(sum(f.stats.cache_misses.values()) for f in jits))
        print(hits, misses)
    """)
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    hits, misses = map(int, runs[1].stdout.split())
    assert hits >= 6 and misses == 0, runs[1].stdout


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, np.uint16), (torch.float16, np.int16)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_16_bit_floats_run_in_the_kernels_and_round_once(dtype, bits, fmt, activation):
    # bfloat16 and float16 are loaded and stored as their bits, computed in
    # float32: the output and grad_input equal the float32 kernels' ones on the
    # same values, rounded.
    x = make_input((6, 5, 4, 3), dtype, fmt, seed=12, scale=3.0, offset=2.0)
    dy = make_input(x.shape, dtype, fmt, seed=13)
    assert cpu._view(x) is not None
    assert cpu._view(x).of(x).dtype == bits
    x16, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y16 = batch_norm(x16, None, None, training=True, activation=activation, backend="cpu")
    y32 = batch_norm(x32, None, None, training=True, activation=activation, backend="cpu")
    assert y16.dtype == dtype and y16.is_contiguous(memory_format=fmt)
    assert torch.equal(y16, y32.to(dtype))
    (g16,), (g32,) = torch.autograd.grad(y16, x16, dy), torch.autograd.grad(y32, x32, dy.float())
    assert g16.dtype == dtype
    assert torch.equal(g16, g32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_and_running_statistics_are_taken_as_their_float32_values(dtype):
    x = make_input((6, 5, 4, 3), dtype, seed=14)
    runs = []
    for pdtype in (dtype, torch.float32):
        w = torch.linspace(0.5, 1.5, 5).to(dtype).to(pdtype).requires_grad_()
        b = torch.linspace(-0.3, 0.3, 5).to(dtype).to(pdtype).requires_grad_()
        rm = torch.linspace(-1.0, 1.0, 5).to(dtype).to(pdtype)
        rv = torch.linspace(0.5, 2.0, 5).to(dtype).to(pdtype)
        ev = batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, backend="cpu")
        xr = x.clone().requires_grad_()
        y = batch_norm(xr, rm, rv, w, b, True, 0.1, 1e-5, activation="relu", backend="cpu")
        grads = torch.autograd.grad(y, (xr, w, b), torch.ones_like(y))
        assert all(g.dtype == t.dtype for g, t in zip(grads, (xr, w, b), strict=True))
        runs.append((ev, y, grads[0], *(t.to(dtype) for t in (*grads[1:], rm, rv))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bfloat16_rounding_matches_torch_on_ties_nan_and_inf():
    from numba import njit

    @njit
    def store(values, out):
        for i in range(values.size):
            out[i] = cpu.K.st(values[i], out)

    values = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5, 3.4e38, float("inf"),
                           float("-inf"), float("nan"), 1e-40, -0.0], dtype=torch.float32)
    out = np.empty(values.numel(), np.uint16)
    store(values.numpy(), out)
    want = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values.numpy()) & ((out & 0x7F80) == 0x7F80) & ((out & 0x7F) != 0)
    assert ((out == want) | nan).all(), (out, want)


def _convert_all(fn, values, out_dtype):
    from numba import njit

    @njit
    def convert(values, out):
        for i in range(values.size):
            out[i] = fn(values[i])

    out = np.empty(values.size, out_dtype)
    convert(values, out)
    return out


def _st_half():
    from numba import njit

    @njit(inline="always")
    def st(value):
        return cpu.K.st(value, np.empty(0, np.int16))
    return st


# What the kernels use (F16C where the target has it), and the integer fallback.
_HALF_LOADS = {"target": lambda: cpu.K.ld, "int": lambda: cpu.K.half_to_f32_int}
_HALF_STORES = {"target": _st_half, "int": lambda: cpu.K.f32_to_half_int}


@pytest.mark.parametrize("method", ["target", "int"])
def test_float16_loads_match_torch_on_every_bit_pattern(method):
    bits = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    got = _convert_all(_HALF_LOADS[method](), bits, np.float32)
    want = torch.from_numpy(bits).view(torch.float16).float().numpy()
    nan = np.isnan(want)
    assert nan.sum() == 2046
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()
    assert np.array_equal(np.signbit(got), np.signbit(want))


def _float32_cases():
    """Random bit patterns, a sweep of the half range, every tie between two
    halves and its neighbours, and the edges (overflow, NaN, Inf, zeros)."""
    rng = np.random.default_rng(0)
    halves = torch.arange(0, 0x7C01, dtype=torch.int16).view(torch.float16).double().numpy()
    ties = ((halves[1:] + halves[:-1]) / 2).astype(np.float32)  # exact in float32
    up, down = np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(0))
    edges = np.array([0, 1, 0x007FFFFF, 0x32FFFFFF, 0x33000000, 0x33000001, 0x387FFFFF,
                      0x38800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,
                      0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FC01234, 0x7FFFFFFF],
                     np.uint32)
    magnitudes = np.concatenate([
        rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32) & 0x7FFFFFFF,
        np.arange(0x32000000, 0x48000000, 331, dtype=np.uint32),
        ties.view(np.uint32), up.view(np.uint32), down.view(np.uint32), edges])
    return np.concatenate([magnitudes, magnitudes | np.uint32(0x80000000)]).view(np.float32)


@pytest.mark.parametrize("method", ["target", "int"])
def test_float16_stores_round_like_torch_on_ties_subnormals_overflow_nan_and_inf(method):
    values = _float32_cases()
    got = _convert_all(_HALF_STORES[method](), values, np.int16)
    want = torch.from_numpy(values).to(torch.float16).view(torch.int16).numpy()
    nan = np.isnan(values)
    assert np.array_equal(got[~nan], want[~nan])
    got_bits = got[nan].view(np.uint16)
    assert ((got_bits & 0x7C00) == 0x7C00).all() and ((got_bits & 0x3FF) != 0).all()
    assert np.array_equal(got_bits >> 15, np.signbit(values[nan]).astype(np.uint16))
