"""Batch Renormalization against the reference formulas, and as exactly BN with r=1, d=0."""

import numpy as np
import pytest
import torch
from helpers import assert_close, make_input, memory_format_for
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
from batchnorm import reference
from batchnorm.functional import batch_norm
from batchnorm.nn.renorm import batch_renorm, renorm_affine, renorm_corrections, renorm_limits

F64 = dict(rtol=1e-10, atol=1e-10)
CLASSES = {2: (batchnorm.BatchRenorm1d, batchnorm.BatchNorm1d),
           3: (batchnorm.BatchRenorm1d, batchnorm.BatchNorm1d),
           4: (batchnorm.BatchRenorm2d, batchnorm.BatchNorm2d),
           5: (batchnorm.BatchRenorm3d, batchnorm.BatchNorm3d)}
SHAPES = [((8, 3), False), ((4, 5, 7), False), ((3, 4, 3, 5), False), ((3, 4, 3, 5), True),
          ((2, 3, 2, 3, 4), True), ((2, 1, 1, 1), False)]


def _set_state(m, C, rm, rv):
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.linspace(0.5, 1.5, C))
            m.bias.copy_(torch.linspace(-0.3, 0.3, C))
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)


def _grads(y, m, x, dy):
    inputs = (x,) if m.weight is None else (x, m.weight, m.bias)
    return torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_rmax_1_dmax_0_is_exactly_our_batch_norm(shape, channels_last, affine, momentum):
    C = shape[1]
    renorm_cls, bn_cls = CLASSES[len(shape)]
    kw = dict(affine=affine, momentum=momentum, dtype=torch.float64)
    a = renorm_cls(C, rmax=1.0, dmax=0.0, warmup_steps=0, relax_steps=0, **kw)
    b = bn_cls(C, **kw)
    rm, rv = torch.linspace(1.0, -1.0, C), torch.linspace(0.2, 3.0, C)
    for m in (a, b):
        _set_state(m, C, rm, rv)
    fmt = memory_format_for(len(shape), channels_last)
    for step in range(2):
        x = make_input(shape, torch.float64, fmt, seed=step, requires_grad=True)
        dy = make_input(shape, torch.float64, seed=10 + step)
        ya, yb = a(x), b(x)
        assert torch.equal(ya, yb)
        for ga, gb in zip(_grads(ya, a, x, dy), _grads(yb, b, x, dy), strict=True):
            assert torch.equal(ga, gb)
        for k, v in b.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), k
    a.eval()
    b.eval()
    x = make_input(shape, torch.float64, fmt, seed=5)
    assert torch.equal(a(x), b(x))


def test_warm_up_is_plain_batch_norm():
    a, b = batchnorm.BatchRenorm2d(3, warmup_steps=3, relax_steps=10), batchnorm.BatchNorm2d(3)
    with torch.no_grad():
        for m in (a, b):
            m.running_mean.fill_(5.0)  # would clip d hard if renorm were on
    for step in range(4):  # steps 0-2, and step 3 where the relaxation starts from 1 and 0
        x = make_input((4, 3, 2, 2), seed=step)
        assert torch.equal(a(x), b(x)), step
    x = make_input((4, 3, 2, 2), seed=4)
    assert not torch.equal(a(x), b(x))  # step 4: limits relaxed a little


@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("rmax,dmax", [(3.0, 5.0), (1.2, 0.25)])  # inside / at the limits
def test_float64_matches_reference(shape, channels_last, rmax, dmax):
    C = shape[1]
    m = CLASSES[len(shape)][0](C, rmax=rmax, dmax=dmax, warmup_steps=0, relax_steps=0,
                               dtype=torch.float64)
    rm = torch.linspace(0.8, -0.8, C, dtype=torch.float64)  # against the input's channel shift
    rv = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    _set_state(m, C, rm, rv)
    fmt = memory_format_for(len(shape), channels_last)
    x = make_input(shape, torch.float64, fmt, seed=1, requires_grad=True)
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    dy = make_input(shape, torch.float64, seed=2)
    gx, gw, gb = _grads(y, m, x, dy)
    assert gx.is_contiguous(memory_format=fmt)
    w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
    out, cache = reference.renorm_forward_train(x.detach().numpy(), w, b, rm.numpy(), rv.numpy(),
                                                rmax, dmax)
    dx, dgamma, dbeta = reference.renorm_backward(dy.numpy(), cache)
    want_rm, want_rv, _ = reference.update_running_stats(rm.numpy(), rv.numpy(), cache["mean"],
                                                         cache["var"], cache["m"], 0.1)
    assert_close(y, out, **F64, name="out")
    assert_close(gx, dx, **F64, name="grad_input")
    assert_close(gw, dgamma, **F64, name="grad_weight")
    assert_close(gb, dbeta, **F64, name="grad_bias")
    assert_close(m.running_mean, want_rm, **F64, name="running_mean")
    assert_close(m.running_var, want_rv, **F64, name="running_var")
    assert m.num_batches_tracked.item() == 1
    if cache["m"] > 2 and dmax < 1:  # the clipped case really clips
        assert np.isclose(np.abs(cache["d"]), dmax).any()
    m.eval()
    xe = make_input(shape, torch.float64, fmt, seed=3)
    want, _ = reference.forward_eval(xe.numpy(), want_rm, want_rv, w, b)
    assert_close(m(xe), want, **F64, name="eval out")


def test_schedule_over_steps_matches_reference():
    m = batchnorm.BatchRenorm1d(4, warmup_steps=2, relax_steps=(4, 2), dtype=torch.float64)
    rm, rv = np.zeros(4), np.ones(4)
    for step in range(8):
        x = make_input((6, 4), torch.float64, seed=step, scale=0.5 + step, offset=step)
        rmax, dmax = renorm_limits(step, 3.0, 5.0, 2, (4, 2))
        assert m.limits() == (rmax, dmax)
        out, cache = reference.renorm_forward_train(x.numpy(), None, None, rm, rv, rmax, dmax)
        assert_close(m(x), out, **F64, name=f"out at step {step}")
        rm, rv, _ = reference.update_running_stats(rm, rv, cache["mean"], cache["var"],
                                                   cache["m"], 0.1)
    assert m.num_batches_tracked.item() == 8 and m.limits() == (3.0, 5.0)


def test_limits_schedule():
    paper = [renorm_limits(t) for t in (0, 5000, 22500, 25000, 40000, 10**6)]
    assert paper == [(1.0, 0.0), (1.0, 0.0), (2.0, 5.0 * 17500 / 20000),
                     (1.0 + 2 * 20000 / 35000, 5.0), (3.0, 5.0), (3.0, 5.0)]
    assert renorm_limits(9, 2.0, 1.0, 10, 0) == (1.0, 0.0)
    assert renorm_limits(10, 2.0, 1.0, 10, 0) == (2.0, 1.0)
    rmax_t, dmax_t = renorm_limits(torch.tensor(22500), 3.0, 5.0, 5000, (35000, 20000))
    assert rmax_t.item() == pytest.approx(2.0) and dmax_t.item() == pytest.approx(4.375)


def test_renorm_is_batch_norm_with_folded_affine():
    """The identity the module is built on: weight' = gamma r, bias' = beta + gamma d."""
    x = make_input((6, 3, 4), torch.float64, seed=4)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    rm, rv = torch.tensor([0.3, -0.2, 5.0], dtype=torch.float64), torch.full((3,), 0.7,
                                                                           dtype=torch.float64)
    y = batch_renorm(x, rm.clone(), rv.clone(), w, b, True, rmax=2.0, dmax=1.0)
    out, cache = reference.renorm_forward_train(x.numpy(), w.numpy(), b.numpy(), rm.numpy(),
                                                rv.numpy(), 2.0, 1.0)
    r, d = torch.from_numpy(cache["r"]), torch.from_numpy(cache["d"])
    folded = batch_norm(x, None, None, w * r, b + w * d, True)
    assert_close(y, out, **F64, name="renorm")
    assert_close(folded, out, **F64, name="batch norm with the folded affine")


def test_gradcheck_with_r_and_d_fixed():
    x = make_input((5, 3, 2), torch.float64, seed=5, requires_grad=True)
    w = torch.tensor([0.7, 1.3, -0.4], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64), torch.tensor(
        [0.5, 1.0, 2.0], dtype=torch.float64)
    mean, var = x.detach().mean((0, 2)), x.detach().var((0, 2), correction=0)
    r, d = renorm_corrections(mean, var, rm, rv, 3.0, 5.0)
    assert ((r - 1).abs() > 1e-3).all() and (d.abs() > 1e-3).all()  # not trivial

    def fn(x, w, b):  # the module's computation with r, d constants
        return batch_norm(x, None, None, *renorm_affine(w, b, r, d), True, activation="silu")

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradcheck_of_batch_renorm_where_every_channel_is_clipped():
    """At the clip limits r and d are locally constant: the stop-gradient is the true gradient."""
    x = make_input((6, 3, 2), torch.float64, seed=6, requires_grad=True)
    w = torch.tensor([0.7, 1.3, -0.4], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    rm = torch.tensor([20.0, -20.0, 20.0], dtype=torch.float64)
    rv = torch.full((3,), 1e-2, dtype=torch.float64)

    def fn(x, w, b):
        return batch_renorm(x, rm.clone(), rv.clone(), w, b, True, rmax=1.5, dmax=0.5)

    mean, var = x.detach().mean((0, 2)), x.detach().var((0, 2), correction=0)
    r, d = renorm_corrections(mean, var, rm, rv, 1.5, 0.5)
    assert torch.equal(r, torch.full_like(r, 1.5)) and torch.equal(d.abs(), torch.full_like(d, 0.5))
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fused_residual_and_activation(activation):
    m = batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0, activation=activation,
                                dtype=torch.float64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -0.5, 0.0]))
        m.running_var.fill_(0.3)
    plain = batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0, dtype=torch.float64)
    plain.load_state_dict(m.state_dict())
    x = make_input((4, 3, 3, 3), torch.float64, seed=7, requires_grad=True)
    res = make_input((4, 3, 3, 3), torch.float64, seed=8, requires_grad=True)
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu}[activation]
    y, want = m(x, res), act(plain(x) + res)
    assert_close(y, want, **F64, name="out")
    dy = make_input((4, 3, 3, 3), torch.float64, seed=9)
    for g, h in zip(torch.autograd.grad(y, (x, res, m.weight), dy),
                    torch.autograd.grad(want, (x, res, plain.weight), dy), strict=True):
        assert_close(g, h, **F64, name="grad")
    assert "activation='relu'" in repr(m) or activation != "relu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_float32_state(dtype):
    m = batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0)
    ref = batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0)
    with torch.no_grad():
        for mod in (m, ref):
            mod.running_mean.fill_(0.4)
    x = make_input((4, 3, 5, 5), dtype, torch.channels_last, seed=10, requires_grad=True)
    y = m(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and m.running_mean.dtype == torch.float32
    assert_close(y, ref(x.detach().float()), 1e-2, 3e-2, name="out vs float32")


def test_without_running_stats_it_is_batch_norm():
    a = batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0, track_running_stats=False)
    b = batchnorm.BatchNorm2d(3, track_running_stats=False)
    x = make_input((4, 3, 2, 2), seed=11, offset=3.0)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_state_dict_is_batch_norms_and_keeps_the_step():
    m = batchnorm.BatchRenorm2d(3, warmup_steps=1, relax_steps=4)
    assert list(m.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    for step in range(3):
        m(make_input((4, 3, 2, 2), seed=step))
    clone = batchnorm.BatchRenorm2d(3, warmup_steps=1, relax_steps=4)
    clone.load_state_dict(m.state_dict())
    assert clone.limits() == m.limits() == (2.0, 2.5)
    x = make_input((4, 3, 2, 2), seed=12)
    assert torch.equal(clone(x), m(x))
    torch_bn = torch.nn.BatchNorm2d(3)
    torch_bn.load_state_dict(m.state_dict())  # and back into PyTorch's module
    assert isinstance(m, torch.nn.BatchNorm2d) and isinstance(m, batchnorm.BatchNorm2d)
    m.reset_running_stats()
    assert m.limits() == (1.0, 0.0)
    text = repr(batchnorm.BatchRenorm1d(3))
    assert "rmax=3.0, dmax=5.0, warmup_steps=5000, relax_steps=(35000, 20000)" in text


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rmax=0.5), ValueError, "rmax must be a finite number >= 1"),
    (dict(rmax=float("inf")), ValueError, "rmax must be a finite number >= 1"),
    (dict(dmax=-0.1), ValueError, "dmax must be a finite number >= 0"),
    (dict(dmax=float("nan")), ValueError, "dmax must be a finite number >= 0"),
    (dict(rmax="3"), TypeError, "rmax must be a number"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    (dict(warmup_steps=1.5), TypeError, "warmup_steps must be an int"),
    (dict(relax_steps=(1, 2, 3)), ValueError, "a pair"),
    (dict(relax_steps=-5), ValueError, "relax_steps must be >= 0"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        batchnorm.BatchRenorm2d(3, **kwargs)


def test_bad_limits_at_call_time_change_nothing():
    m = batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0)
    m(make_input((4, 3, 2, 2), seed=13))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.rmax = 0.9
    with pytest.raises(ValueError, match="rmax must be a finite number >= 1"):
        m(make_input((4, 3, 2, 2), seed=14))
    m.rmax = 3.0
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        m(torch.randn(4, 4, 2, 2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="dmax must be a finite number >= 0"):
        batch_renorm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, dmax=-1.0)


class _NoTorchBatchNorm(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert "batch_norm" not in func.name(), f"PyTorch's {func.name()} was called"
        return func(*args, **(kwargs or {}))


def test_runs_without_torch_batch_norm():
    m = batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0, activation="relu")
    x = make_input((4, 3, 2, 2), requires_grad=True)
    with _NoTorchBatchNorm():
        m(x).sum().backward()
        m.eval()(x)
    assert x.grad is not None and m.num_batches_tracked.item() == 1
