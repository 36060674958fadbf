"""``batchnorm.functional.batch_norm`` on every backend against the reference."""

import numpy as np
import pytest
import torch
from helpers import SHAPES, TOL, assert_close, make_input, memory_format_for

from batchnorm import reference
from batchnorm._backend import unavailable_reason
from batchnorm.functional import ACTIVATIONS, batch_norm

CPU_BACKENDS = [b for b in ("torch", "cpu") if unavailable_reason(b, torch.empty(0)) is None]
F64 = dict(rtol=1e-10, atol=1e-10)


def _params(C, dtype=torch.float64, requires_grad=True):
    w = torch.linspace(0.5, 1.5, C, dtype=dtype).requires_grad_(requires_grad)
    b = torch.linspace(-0.3, 0.3, C, dtype=dtype).requires_grad_(requires_grad)
    return w, b


def _trainable(shape):
    return int(np.prod(shape)) // shape[1] > 1


# channels_last exists for 4D/5D only; one value per channel cannot train.
F64_CASES = [(shape, training, cl) for shape in SHAPES for training in (True, False)
             for cl in (False, True)
             if (not cl or len(shape) in (4, 5)) and (not training or _trainable(shape))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,training,channels_last", F64_CASES)
def test_float64_matches_reference(backend, shape, training, channels_last):
    C = shape[1]
    fmt = memory_format_for(len(shape), channels_last)
    x = make_input(shape, torch.float64, fmt, seed=1, requires_grad=True)
    w, b = _params(C)
    rm = torch.linspace(-0.2, 0.2, C, dtype=torch.float64)
    rv = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend=backend)
    assert y.is_contiguous(memory_format=fmt)
    dy = make_input(shape, torch.float64, seed=2)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)

    xn = x.detach().numpy()
    if training:
        out, cache = reference.forward_train(xn, w.detach().numpy(), b.detach().numpy())
        want_rm, want_rv, _ = reference.update_running_stats(
            rm0.numpy(), rv0.numpy(), cache["mean"], cache["var"], cache["m"], 0.1)
    else:
        out, cache = reference.forward_eval(xn, rm0.numpy(), rv0.numpy(), w.detach().numpy(),
                                            b.detach().numpy())
        want_rm, want_rv = rm0.numpy(), rv0.numpy()
    dx, dgamma, dbeta, _ = reference.backward(dy.numpy(), cache)
    assert_close(y, out, **F64, name="out")
    assert_close(gx, dx, **F64, name="grad_input")
    assert_close(gw, dgamma, **F64, name="grad_weight")
    assert_close(gb, dbeta, **F64, name="grad_bias")
    assert_close(rm, want_rm, **F64, name="running_mean")
    assert_close(rv, want_rv, **F64, name="running_var")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_epilogue_matches_reference(backend, activation, with_residual, training):
    shape = (4, 5, 3, 3)
    x = make_input(shape, torch.float64, seed=3, requires_grad=True)
    r = make_input(shape, torch.float64, seed=4, requires_grad=True) if with_residual else None
    w, b = _params(5)
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64)
    y = batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation=activation,
                   negative_slope=0.2, residual=r, backend=backend)
    dy = make_input(shape, torch.float64, seed=5)
    inputs = (x, w, b) + ((r,) if r is not None else ())
    grads = torch.autograd.grad(y, inputs, dy)
    kw = dict(residual=None if r is None else r.detach().numpy(), activation=activation,
              negative_slope=0.2)
    if training:
        out, cache = reference.forward_train(x.detach().numpy(), w.detach().numpy(),
                                             b.detach().numpy(), **kw)
    else:
        out, cache = reference.forward_eval(x.detach().numpy(), rm.numpy(), rv.numpy(),
                                            w.detach().numpy(), b.detach().numpy(), **kw)
    assert_close(y, out, **F64, name="out")
    for got, want, name in zip(grads, reference.backward(dy.numpy(), cache),
                               ("grad_input", "grad_weight", "grad_bias", "grad_residual"),
                               strict=False):
        assert_close(got, want, **F64, name=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_lower_precision_matches_reference(backend, dtype, channels_last, activation):
    shape = (8, 6, 5, 7)
    fmt = memory_format_for(4, channels_last)
    x = make_input(shape, dtype, fmt, seed=6, requires_grad=True)
    w, b = _params(6, torch.float32)
    rm, rv = torch.zeros(6), torch.ones(6)
    y = batch_norm(x, rm, rv, w, b, True, activation=activation, backend=backend)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    dy = make_input(shape, dtype, seed=7)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    assert gx.dtype == dtype and gw.dtype == gb.dtype == torch.float32
    assert rm.dtype == rv.dtype == torch.float32

    x64 = x.detach().double().numpy()
    out, cache = reference.forward_train(x64, w.detach().double().numpy(),
                                         b.detach().double().numpy(), activation=activation)
    dx, dgamma, dbeta, _ = reference.backward(dy.double().numpy(), cache)
    want_rm, want_rv, _ = reference.update_running_stats(
        np.zeros(6), np.ones(6), cache["mean"], cache["var"], cache["m"], 0.1)
    rtol, atol = TOL[dtype]
    grad_atol = atol * 10 if dtype != torch.float32 else 1e-4
    assert_close(y, out, rtol, atol, name="out")
    assert_close(gx, dx, rtol, grad_atol, name="grad_input")
    assert_close(gw, dgamma, rtol, grad_atol * 5, name="grad_weight")
    assert_close(gb, dbeta, rtol, grad_atol * 5, name="grad_bias")
    # The statistics are accumulated in float32 from the rounded input.
    assert_close(rm, want_rm, 1e-5, 1e-5, name="running_mean")
    assert_close(rv, want_rv, 1e-5, 1e-5, name="running_var")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_and_gradgradcheck(backend, training, activation):
    x = make_input((3, 2, 2, 2), torch.float64, seed=8, requires_grad=True)
    r = make_input((3, 2, 2, 2), torch.float64, seed=9, requires_grad=True)
    w, b = _params(2)
    rm = torch.tensor([0.1, -0.2], dtype=torch.float64)
    rv = torch.tensor([0.7, 1.3], dtype=torch.float64)

    def fn(x, w, b, r):
        return batch_norm(x, None if training else rm, None if training else rv, w, b,
                          training, activation=activation, negative_slope=0.3, residual=r,
                          backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b, r))
    if activation != "relu" and activation != "leaky_relu":
        # relu's kink makes finite differences of the second derivative unreliable
        # near zero; the smooth activations and None check the composite path.
        assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradgradcheck_relu_away_from_kink(backend):
    # Inputs chosen so no pre-activation lies near zero.
    x = torch.tensor([[-2.0, 1.0], [1.5, -1.0], [0.2, 3.0]], dtype=torch.float64,
                     requires_grad=True)
    w, b = _params(2)

    def fn(x, w, b):
        return batch_norm(x, None, None, w, b, True, activation="relu", backend=backend)

    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_variance_accurate_with_large_offset():
    # Mean 1e4, std 1e-2: E[x^2] - E[x]^2 in float32 would lose every digit.
    x = make_input((64, 3, 8, 8), torch.float32, seed=10, scale=1e-2, offset=1e4)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0)
    out, cache = reference.forward_train(x.double().numpy())
    unbiased = cache["var"] * cache["m"] / (cache["m"] - 1)
    assert_close(rv, unbiased, 1e-5, 0, name="running_var")
    assert_close(rm, cache["mean"], 1e-7, 0, name="running_mean")
    # A float32 mean near 1e4 is rounded by ~5e-4, i.e. 0.05 standard deviations:
    # the output can be no better than that, and no worse than PyTorch's own.
    torch_err = np.abs(torch.nn.functional.batch_norm(x, None, None, training=True).numpy()
                       - out).max()
    our_err = np.abs(y.numpy() - out).max()
    assert our_err <= max(1.5 * torch_err, 1e-3), (our_err, torch_err)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w, b = _params(3, torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, w, b, training)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(3))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_training_without_running_stats_and_affine():
    x = make_input((5, 4, 3), torch.float64, seed=11, requires_grad=True)
    y = batch_norm(x, None, None, training=True)
    out, cache = reference.forward_train(x.detach().numpy())
    assert_close(y, out, **F64, name="out")
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert_close(gx, reference.backward(np.ones(x.shape), cache)[0], **F64, name="grad_input")


def test_gradients_only_where_asked():
    x = make_input((4, 3, 2), torch.float64, seed=12)
    w, b = _params(3)
    y = batch_norm(x, None, None, w, b, True)
    gw, = torch.autograd.grad(y.sum() + (y * y).sum(), (w,))
    _, cache = reference.forward_train(x.numpy(), w.detach().numpy(), b.detach().numpy())
    dy = 1 + 2 * y.detach().numpy()
    assert_close(gw, reference.backward(dy, cache)[1], **F64, name="grad_weight")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_cache_blocked_path_matches_reference(monkeypatch, channels_last, dtype, activation):
    """Inputs above torch_ops.BLOCK elements are walked in blocks; force it on small ones."""
    from batchnorm.kernels import torch_ops

    monkeypatch.setattr(torch_ops, "BLOCK", 64)
    shape = (3, 5, 7, 6)
    fmt = memory_format_for(4, channels_last)
    x = make_input(shape, dtype, fmt, seed=13, offset=3.0, requires_grad=True)
    w, b = _params(5, torch.float64 if dtype == torch.float64 else torch.float32)
    rm = torch.zeros(5, dtype=w.dtype)
    rv = torch.ones(5, dtype=w.dtype)
    y = batch_norm(x, rm, rv, w, b, True, activation=activation, backend="torch")
    dy = make_input(shape, dtype, seed=14)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    out, cache = reference.forward_train(x.detach().double().numpy(), w.detach().double().numpy(),
                                         b.detach().double().numpy(), activation=activation)
    dx, dgamma, dbeta, _ = reference.backward(dy.double().numpy(), cache)
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-2, 3e-2)
    assert_close(y, out, rtol, atol, name="out")
    assert_close(gx, dx, rtol, atol * 3, name="grad_input")
    assert_close(gw, dgamma, rtol, atol * 10, name="grad_weight")
    assert_close(gb, dbeta, rtol, atol * 10, name="grad_bias")
    want_rm, _, _ = reference.update_running_stats(np.zeros(5), np.ones(5), cache["mean"],
                                                   cache["var"], cache["m"], 0.1)
    assert_close(rm, want_rm, 1e-6, 1e-6, name="running_mean")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_without_gradients_no_autograd_node_and_the_same_results(backend, training):
    x = make_input((6, 4, 3, 3), seed=11, offset=1.0, requires_grad=True)
    w, b = _params(4, torch.float32)
    stats = [(torch.zeros(4), torch.full((4,), 2.0)) for _ in range(2)]
    y = batch_norm(x, *stats[0], w, b, training, activation="silu", backend=backend)
    with torch.no_grad():
        y_nograd = batch_norm(x, *stats[1], w, b, training, activation="silu", backend=backend)
    assert y.grad_fn is not None and y_nograd.grad_fn is None
    assert torch.equal(y.detach(), y_nograd)
    for a, c in zip(stats[0], stats[1], strict=True):
        assert torch.equal(a, c)
