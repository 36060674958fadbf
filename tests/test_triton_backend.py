"""The Triton backend against ``batchnorm.reference``, on awkward shapes.

With a CUDA device the kernels run on it. Without one they run in Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``, which the root
``conftest.py`` sets before Triton is first imported): the same kernel code, executed with NumPy, so
CI checks their logic (indexing, masks, the split reductions and their
merge, the fused epilogues, the running-statistics update) on small shapes.
The interpreter runs small tiles (``TILE_BYTES``), so these shapes still take
the multi-tile and multi-slice paths.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close, make_input

from batchnorm import _backend, reference
from batchnorm.functional import ACTIVATIONS, batch_norm
from batchnorm.kernels import torch_ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if importlib.util.find_spec("triton") is None:
    pytest.skip("the Triton backend needs Triton (pip install 'batchnorm[triton]')",
                allow_module_level=True)

# Without CUDA the root conftest.py has set TRITON_INTERPRET=1 before Triton
# was first imported (Triton reads it then): the kernels run in the interpreter.
from batchnorm.kernels import triton as tk  # noqa: E402


@pytest.fixture(autouse=True)
def _small_tiles_and_interpreter(monkeypatch):
    """Small tiles (the interpreter's), so these small shapes take the multi-tile,
    multi-slice paths on a GPU too; without a GPU, ``backend="triton"`` accepts
    CPU tensors only under the interpreter."""
    monkeypatch.setattr(tk, "TILE_BYTES", 256)
    monkeypatch.setattr(tk, "_sms", lambda _device: 2)  # the interpreter's slicing, on GPUs too
    if not CUDA:
        if not tk.INTERPRETED:
            pytest.skip("without CUDA these tests need Triton's interpreter: "
                        "TRITON_INTERPRET=1 (set by conftest.py unless the environment "
                        "sets it otherwise)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")


LAYOUTS = {
    "planar": torch.contiguous_format,
    "nhwc": torch.channels_last,
    "ndhwc": torch.channels_last_3d,
}


def _input(shape, dtype=torch.float32, layout="planar", seed=0, **kw):
    return make_input(shape, dtype, LAYOUTS[layout], seed=seed, **kw).to(DEVICE)


def _params(C, dtype):
    # As under autocast: float32 parameters for 16-bit inputs.
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.linspace(0.5, 1.5, C, dtype=pdtype, device=DEVICE)
    b = torch.linspace(-0.3, 0.3, C, dtype=pdtype, device=DEVICE)
    return w, b


def _run(x, activation=None, residual=None, training=True, slope=0.01, backend="triton",
         momentum=0.1):
    """Output, every gradient, and the running statistics after one call."""
    C = x.shape[1]
    x = x.detach().requires_grad_()
    w, b = (t.requires_grad_() for t in _params(C, x.dtype))
    r = None if residual is None else residual.detach().clone().requires_grad_()
    rm = torch.linspace(-1, 1, C, device=DEVICE, dtype=w.dtype)
    rv = torch.linspace(0.5, 2, C, device=DEVICE, dtype=w.dtype)
    y = batch_norm(x, rm, rv, w, b, training, momentum, 1e-5, activation=activation,
                   negative_slope=slope, residual=r, backend=backend)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(
        device=DEVICE, dtype=x.dtype).contiguous(memory_format=_format_of(x))
    inputs = [x, w, b] + ([r] if r is not None else [])
    grads = torch.autograd.grad(y, inputs, dy)
    return dict(out=y.detach(), dy=dy, grads=grads, rm=rm, rv=rv)


def _format_of(x):
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if x.dim() == {torch.channels_last: 4, torch.channels_last_3d: 5}[fmt] and \
                not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _np(t):
    return t.detach().to("cpu", torch.float64).numpy()


def _check_against_reference(x, got, activation=None, residual=None, training=True,
                             slope=0.01, tol=None):
    C = x.shape[1]
    w, b = (_np(t) for t in _params(C, x.dtype))
    kw = dict(activation=activation, negative_slope=slope,
              residual=None if residual is None else _np(residual))
    rm0 = np.linspace(-1, 1, C)
    rv0 = np.linspace(0.5, 2, C)
    if training:
        out, cache = reference.forward_train(_np(x), w, b, 1e-5, **kw)
        rm, rv, _ = reference.update_running_stats(rm0, rv0, cache["mean"], cache["var"],
                                                   cache["m"], 0.1)
    else:
        out, cache = reference.forward_eval(_np(x), rm0, rv0, w, b, 1e-5, **kw)
        rm, rv = rm0, rv0
    rtol, atol = tol or TOL[x.dtype]
    assert_close(got["out"], out, rtol, atol, name="out")
    want = reference.backward(_np(got["dy"]), cache)
    names = ("grad_input", "grad_weight", "grad_bias", "grad_residual")
    # Without a residual there are three gradients: zip stops there.
    for g, w_, name in zip(got["grads"], want, names, strict=False):
        # Per-channel sums of low-precision gradients are exact to float32 but
        # add up many rounded terms: scale the tolerance by the sum's size.
        scale = 1.0 if g.dim() > 1 else max(1.0, float(np.abs(w_).max()))
        assert_close(g, w_, rtol, atol * scale, name=name)
    assert_close(got["rm"], rm, 1e-6, 1e-6, name="running_mean")
    assert_close(got["rv"], rv, 1e-5, 1e-6, name="running_var")


# ---------------------------------------------------------------- shapes, dtypes, layouts

CASES = [
    ((2, 1, 3, 5), "planar"),    # C = 1
    ((2, 1, 3, 5), "nhwc"),
    ((3, 7, 5), "planar"),       # C prime, L odd
    ((1, 3, 2), "planar"),       # N * L = 2
    ((2, 3), "planar"),          # (N, C): rows, N * L = 2
    ((17, 13), "planar"),
    ((3, 4, 1, 1), "planar"),    # 1x1 spatial: rows
    ((16, 3, 8, 8), "planar"),   # several slices per channel
    ((16, 3, 8, 8), "nhwc"),
    ((2, 5, 3, 4, 3), "planar"),
    ((2, 5, 3, 4, 3), "ndhwc"),
    ((4, 6, 5, 7), "nhwc"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_training_matches_the_reference(shape, layout, dtype):
    x = _input(shape, dtype, layout, seed=1, scale=2.0, offset=0.5)
    assert tk.runs_on(x)
    _check_against_reference(x, _run(x))


@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_every_epilogue_matches_the_reference(layout, activation, residual):
    shape = (3, 5, 4, 3)
    x = _input(shape, torch.float32, layout, seed=1, scale=2.0, offset=0.5)
    res = _input(shape, torch.float32, layout, seed=2) if residual else None
    slope = -0.3 if activation == "leaky_relu" and residual else 0.2
    got = _run(x, activation, res, slope=slope)
    _check_against_reference(x, got, activation, res, slope=slope)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_low_precision_epilogues_match_the_reference(layout, activation, dtype):
    shape = (4, 6, 3, 5)
    x = _input(shape, dtype, layout, seed=3)
    res = _input(shape, dtype, layout, seed=4)
    got = _run(x, activation, res)
    _check_against_reference(x, got, activation, res)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_eval_mode_matches_the_reference(layout, activation):
    x = _input((4, 5, 3, 3), torch.float32, layout, seed=5)
    got = _run(x, activation, training=False)
    _check_against_reference(x, got, activation, training=False)


def test_a_residual_in_another_layout_is_read_correctly():
    x = _input((3, 4, 5, 6), torch.float32, "nhwc", seed=1)
    res = _input((3, 4, 5, 6), torch.float32, "planar", seed=2)
    got = _run(x, "relu", res)
    _check_against_reference(x, got, "relu", res)
    assert got["out"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["always", "never"])
@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (3, 5, 3, 7)], ids=str)
def test_planar_flat_and_row_indexing_agree_with_the_reference(shape, mode, monkeypatch):
    monkeypatch.setattr(tk, "PLANAR_FLAT", mode)
    x = _input(shape, torch.float32, "planar", seed=22)
    res = _input(shape, torch.float32, "planar", seed=23)
    _check_against_reference(x, _run(x, "silu", res), "silu", res)

def test_the_test_shapes_take_the_multi_tile_multi_slice_paths():
    for planar, (N, C, L) in ((True, (16, 3, 64)), (False, (16, 3, 64))):
        _, S, per, _ = tk._reduce_config(planar, N, C, L, 4, tk._sms(torch.device(DEVICE)),
                                         tk.TILE_BYTES)
        assert S > 1
        assert per > 1



@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_real_launch_configurations_on_a_resnet_shape(layout, dtype, monkeypatch):
    """The GPU's own tile sizes and slice counts (the other tests shrink them)."""
    monkeypatch.undo()
    x = _input((32, 64, 28, 28), dtype, layout, seed=21)
    _check_against_reference(x, _run(x, "relu"), "relu")

# ---------------------------------------------------------------- accuracy, determinism

@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_large_offset_small_spread_keeps_float32_accuracy(layout):
    x = _input((8, 4, 6, 6), torch.float32, layout, seed=6, scale=1e-2, offset=1e4)
    got = _run(x, "relu")
    _check_against_reference(x, got, "relu", tol=(1e-4, 1e-4))


@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_results_are_bitwise_reproducible(layout):
    x = _input((16, 3, 8, 8), torch.float32, layout, seed=7)
    first, second = _run(x, "relu"), _run(x, "relu")
    for a, b in zip((first["out"], *first["grads"], first["rm"], first["rv"]),
                    (second["out"], *second["grads"], second["rm"], second["rv"]),
                    strict=True):
        assert torch.equal(a, b)


def test_nan_propagates_like_torch():
    x = _input((4, 3, 5), seed=8)
    x[1, 0, 2] = float("nan")
    ours = batch_norm(x, None, None, training=True, activation="relu", backend="triton")
    theirs = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert_close(ours[:, 1:], theirs[:, 1:], 1e-5, 1e-5)


def test_64_bit_offsets_give_the_same_results(monkeypatch):
    x = _input((5, 3, 4, 6), torch.float32, "nhwc", seed=9)
    want = _run(x, "silu")
    monkeypatch.setattr(tk, "INT64_FROM", 0)
    got = _run(x, "silu")
    for a, b in zip((got["out"], *got["grads"]), (want["out"], *want["grads"]), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the backend contract

def test_float64_and_other_layouts_take_the_portable_path():
    for x in (_input((3, 4, 5), torch.float64),
              _input((3, 4, 5, 6)).permute(0, 2, 1, 3)):
        assert not tk.runs_on(x)
        got, want = _run(x), _run(x, backend="torch")
        for a, b in zip((got["out"], *got["grads"]), (want["out"], *want["grads"]),
                        strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_the_two_backward_passes_compose_to_the_backward(layout):
    """SyncBatchNorm's path: backward_reduce, (sums added up), backward_elementwise."""
    x = _input((4, 5, 3, 3), torch.float32, layout, seed=10)
    res = _input((4, 5, 3, 3), torch.float32, layout, seed=11)
    w, b = _params(5, x.dtype)
    out, act, mean, var, invstd = tk.forward(x, None, None, w, b, res, True, 1e-5, "silu", 0.01)
    dy = torch.randn_like(out)
    gx, gw, gb, gr = tk.backward(dy, x, mean, invstd, w, act, "silu", 0.01, True)
    sum_g, sum_gxc, g = tk.backward_reduce(dy, x, mean, act, "silu", 0.01, True, True)
    assert_close(sum_g, gb, 1e-6, 1e-6, name="sum_g")
    assert_close(sum_gxc * invstd, gw, 1e-6, 1e-6, name="sum_gxc")
    assert torch.equal(g, gr)
    gx2 = tk.backward_elementwise(dy, x, mean, invstd, w, sum_g, sum_gxc, x.numel() // 5, act,
                                  "silu", 0.01, True, g)
    assert_close(gx2, gx, 1e-6, 1e-6, name="grad_input")


@pytest.mark.parametrize("layout", ["planar", "nhwc"])
def test_batch_stats_and_normalize_match_the_portable_path(layout):
    x = _input((6, 5, 4, 3), torch.bfloat16, layout, seed=12, offset=3.0)
    mean, var = tk.batch_stats(x)
    want_mean, want_var = torch_ops.batch_stats(x)
    assert mean.dtype == torch.float64 and var.dtype == torch.float32
    assert_close(mean, want_mean, 1e-6, 1e-6, name="mean")
    assert_close(var, want_var, 1e-5, 1e-6, name="var")
    invstd = torch.rsqrt(var + 1e-5)
    w, b = _params(5, x.dtype)
    out, _ = tk.normalize(x, mean, invstd, w, b, activation="relu")
    want, _ = torch_ops.normalize(x, mean, invstd, w, b, activation="relu")
    assert_close(out, want, 1e-2, 1e-2, name="out")
    assert out.stride() == x.stride()


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_running_statistics_update_on_the_device(momentum):
    x = _input((6, 3, 4), seed=13)
    got = _run(x, momentum=momentum)
    xn = _np(x)
    mean, var = xn.mean(axis=(0, 2)), xn.var(axis=(0, 2))
    rm, rv, _ = reference.update_running_stats(np.linspace(-1, 1, 3), np.linspace(0.5, 2, 3),
                                               mean, var, 24, momentum)
    assert_close(got["rm"], rm, 1e-6, 1e-6, name="running_mean")
    assert_close(got["rv"], rv, 1e-6, 1e-6, name="running_var")


# ---------------------------------------------------------------- resolver

def test_auto_never_picks_the_interpreter_for_cpu_tensors():
    assert _backend.resolve_backend("auto", torch.empty(2, 3)) is not tk


def test_triton_on_a_cpu_tensor_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = _backend.unavailable_reason("triton", torch.empty(2, 3))
    assert "CUDA tensors" in reason and "TRITON_INTERPRET" in reason


def test_triton_on_another_device_says_why():
    assert "CUDA" in _backend.unavailable_reason("triton", torch.empty(2, 3, device="meta"))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_picks_triton_for_cuda_tensors():
    assert _backend.resolve_backend("auto", torch.empty(2, 3, device="cuda")) is tk



@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_training_step_replays_in_a_cuda_graph():
    """No host synchronisation anywhere: the whole step (statistics, apply,
    backward, running-statistics update) is captured once and replayed."""
    import batchnorm

    bn = batchnorm.BatchNorm2d(8, activation="relu", backend="triton").cuda()
    eager = batchnorm.BatchNorm2d(8, activation="relu", backend="triton").cuda()
    eager.load_state_dict(bn.state_dict())
    static_x = torch.randn(4, 8, 6, 6, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (compiles the kernels)
        for _ in range(2):
            bn.weight.grad = None
            bn(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    eager.load_state_dict(bn.state_dict())
    graph = torch.cuda.CUDAGraph()
    bn.weight.grad = None
    with torch.cuda.graph(graph):
        static_y = bn(static_x)
        static_y.sum().backward()
    for step in range(3):
        x = torch.randn(4, 8, 6, 6, device="cuda",
                        generator=torch.Generator("cuda").manual_seed(step))
        static_x.copy_(x)
        graph.replay()
        eager.weight.grad = None
        y = eager(x)
        y.sum().backward()
        assert_close(static_y, y, 1e-6, 1e-6, name=f"replay {step} output")
        assert_close(bn.weight.grad, eager.weight.grad, 1e-5, 1e-5, name="grad_weight")
    # num_batches_tracked is a Python-side increment, not part of the graph.
    assert_close(bn.running_mean, eager.running_mean, 1e-6, 1e-6, name="running_mean")
    assert_close(bn.running_var, eager.running_var, 1e-6, 1e-6, name="running_var")

# ---------------------------------------------------------------- torch.compile

def test_custom_ops_pass_torch_library_checks():
    x = _input((4, 3, 5), seed=14)
    w, b = _params(3, x.dtype)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    torch.library.opcheck(torch.ops.batchnorm.triton_forward.default,
                          (x, rm, rv, w, b, None, True, 1e-5, "silu", 0.01))
    out, pre, mean, var, invstd = torch.ops.batchnorm.triton_forward(
        x, rm, rv, w, b, None, True, 1e-5, "silu", 0.01)
    torch.library.opcheck(torch.ops.batchnorm.triton_backward.default,
                          (torch.randn_like(out), x, mean, invstd, w, pre, "silu", 0.01, True,
                           [True, True, True, False]))
    torch.library.opcheck(torch.ops.batchnorm.triton_update_running_stats.default,
                          (rm, rv, mean, var, 20, 0.1))


def test_compiled_function_matches_eager():
    x = _input((4, 3, 5, 2), torch.float32, "nhwc", seed=15)
    res = _input((4, 3, 5, 2), torch.float32, "nhwc", seed=16)

    def step(x, res, w, b, rm, rv):
        y = batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation="relu", residual=res,
                       backend="triton")
        return (y * y).sum()

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        xx, rr = x.clone().requires_grad_(), res.clone().requires_grad_()
        w, b = (t.requires_grad_() for t in _params(3, x.dtype))
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        loss = fn(xx, rr, w, b, rm, rv)
        results.append([loss.detach(), *torch.autograd.grad(loss, [xx, rr, w, b]), rm, rv])
    for a, b in zip(*results, strict=True):
        assert_close(a, b, 1e-6, 1e-6)



def test_compiled_module_matches_eager_over_training_steps():
    import copy

    import batchnorm

    eager = batchnorm.BatchNorm2d(4, activation="relu", backend="triton").to(DEVICE)
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, backend="aot_eager")
    for step in range(2):
        x = _input((3, 4, 5, 5), torch.float32, "nhwc", seed=20 + step)
        y_e, y_c = eager(x), compiled(x)
        assert_close(y_c, y_e, 1e-6, 1e-6, name=f"step {step} output")
    for name, b_e in eager.named_buffers():
        assert_close(dict(compiled_src.named_buffers())[name], b_e, 1e-6, 1e-6, name=name)
    assert compiled_src.num_batches_tracked.item() == 2


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_an_h100():
    """The interpreter runs the kernels' Python; this compiles them, every variant
    the backend launches, with Triton's real compiler for sm_90 (no GPU needed),
    which finds code that does not type-check or lower (it found three bugs)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).resolve().parent.parent / "scripts" / "check_triton_compiles.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    count = int(done.stdout.split("compiled ")[-1].split()[0])
    assert count > 200, done.stdout[-2000:]

# ---------------------------------------------------------------- the GPU benchmark

def test_the_gpu_benchmark_script_runs_end_to_end(tmp_path, capsys):
    """Its whole path (accuracy check, three sides, CSV, table, chart) on a tiny
    case, so a GPU session's time is not lost to a broken script."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_gpu

    out = tmp_path / "smoke.csv"
    assert bench_gpu.main(["--smoke", "--smoke-shapes", "1", "--device", DEVICE, "--backend",
                           "triton", "--configs", "bf16_nhwc", "--epilogues", "add_relu",
                           "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 3  # header, forward, backward, forward+backward
    assert "| bf16_nhwc | add_relu | forward+backward |" in capsys.readouterr().out
