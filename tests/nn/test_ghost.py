"""Ghost batches (``virtual_batch_size=``) against a direct per-chunk computation."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, assert_close, make_input, memory_format_for
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
from batchnorm import reference
from batchnorm.nn.ghost import ghost_batch_norm, ghost_batch_sizes

F64 = dict(rtol=1e-10, atol=1e-10)
CLASSES = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
           5: batchnorm.BatchNorm3d}


def _per_chunk(x, w, b, rm, rv, sizes, momentum, residual=None, activation=None):
    """The oracle: the reference on each ghost batch in turn, then one momentum step.

    Returns ``(out, cache list, running_mean, running_var)``.
    """
    xn = x.detach().numpy()
    rn = None if residual is None else residual.detach().numpy()
    outs, caches, means, variances, counts = [], [], [], [], []
    start = 0
    for n in sizes:
        out, cache = reference.forward_train(
            xn[start:start + n], w, b, residual=None if rn is None else rn[start:start + n],
            activation=activation)
        outs.append(out)
        caches.append(cache)
        means.append(cache["mean"])
        variances.append(cache["var"] * cache["m"] / (cache["m"] - 1))
        counts.append(n)
        start += n
    wts = np.array(counts, dtype=np.float64)[:, None] / sum(counts)
    mean = (wts * np.stack(means)).sum(0)
    var = (wts * np.stack(variances)).sum(0)
    new_rm = (1 - momentum) * rm + momentum * mean
    new_rv = (1 - momentum) * rv + momentum * var
    return np.concatenate(outs), caches, new_rm, new_rv


def _grads_per_chunk(dy, caches, sizes):
    dxs, dws, dbs, drs = [], 0.0, 0.0, []
    start = 0
    for n, cache in zip(sizes, caches, strict=True):
        dx, dw, db, dr = reference.backward(dy[start:start + n], cache)
        dxs.append(dx)
        drs.append(dr)
        dws, dbs = dws + dw, dbs + db
        start += n
    return np.concatenate(dxs), dws, dbs, np.concatenate(drs)


CASES = [
    ((8, 3), 4, False),          # divisible, (N, C)
    ((10, 3), 4, False),         # remainder of 2 samples: own ghost batch
    ((9, 5), 4, False),          # remainder of 1 value per channel: merged into the last
    ((7, 3, 5), 3, False),       # remainder of 1 sample with 5 values: own ghost batch
    ((12, 4, 3, 5), 4, False),
    ((12, 4, 3, 5), 4, True),    # channels_last, divisible
    ((12, 4, 3, 5), 5, True),    # channels_last, remainder 2
    ((6, 65, 1, 1), 2, True),    # 1x1 spatial, channels_last
    ((5, 2, 2, 3, 3), 2, True),  # 5D channels_last_3d, remainder 1 sample (18 values)
    ((6, 1, 4), 1, False),       # one sample per ghost batch, with spatial extent
]


@pytest.mark.parametrize("shape,V,channels_last", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_float64_matches_per_chunk_reference(shape, V, channels_last, momentum):
    C = shape[1]
    fmt = memory_format_for(len(shape), channels_last)
    m = CLASSES[len(shape)](C, momentum=momentum, dtype=torch.float64, virtual_batch_size=V)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, C))
        m.bias.copy_(torch.linspace(-0.3, 0.3, C))
        m.running_mean.copy_(torch.linspace(-0.2, 0.2, C))
        m.running_var.copy_(torch.linspace(0.5, 2.0, C))
    rm0, rv0 = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
    x = make_input(shape, torch.float64, fmt, seed=1, requires_grad=True)
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    dy = make_input(shape, torch.float64, seed=2)
    gx, gw, gb = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    assert gx.is_contiguous(memory_format=fmt)

    L = int(np.prod(shape[2:]))
    sizes = ghost_batch_sizes(shape[0], V, L)
    factor = 1.0 if momentum is None else momentum  # first batch: cumulative average = 1
    out, caches, want_rm, want_rv = _per_chunk(x, m.weight.detach().numpy(),
                                               m.bias.detach().numpy(), rm0, rv0, sizes, factor)
    dx, dw, db, _ = _grads_per_chunk(dy.numpy(), caches, sizes)
    assert_close(y, out, **F64, name="out")
    assert_close(gx, dx, **F64, name="grad_input")
    assert_close(gw, dw, **F64, name="grad_weight")
    assert_close(gb, db, **F64, name="grad_bias")
    assert_close(m.running_mean, want_rm, **F64, name="running_mean")
    assert_close(m.running_var, want_rv, **F64, name="running_var")
    assert m.num_batches_tracked.item() == 1
    # Eval afterwards: plain batch norm with the running statistics.
    m.eval()
    xe = make_input(shape, torch.float64, fmt, seed=3)
    want, _ = reference.forward_eval(xe.numpy(), want_rm, want_rv, m.weight.detach().numpy(),
                                     m.bias.detach().numpy())
    assert_close(m(xe), want, **F64, name="eval out")


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_fused_residual_and_activation_per_chunk(activation):
    shape, V = (10, 3, 2, 3), 4
    m = batchnorm.BatchNorm2d(3, dtype=torch.float64, virtual_batch_size=V, activation=activation)
    x = make_input(shape, torch.float64, seed=4, requires_grad=True)
    r = make_input(shape, torch.float64, seed=5, requires_grad=True)
    y = m(x, r)
    dy = make_input(shape, torch.float64, seed=6)
    gx, gr, gw, gb = torch.autograd.grad(y, (x, r, m.weight, m.bias), dy)
    sizes = ghost_batch_sizes(10, V, 6)
    out, caches, want_rm, want_rv = _per_chunk(x, None, None, np.zeros(3), np.ones(3), sizes,
                                               0.1, residual=r, activation=activation)
    dx, dw, db, dr = _grads_per_chunk(dy.numpy(), caches, sizes)
    for got, want, name in ((y, out, "out"), (gx, dx, "grad_input"), (gr, dr, "grad_residual"),
                            (gw, dw, "grad_weight"), (gb, db, "grad_bias"),
                            (m.running_mean, want_rm, "running_mean"),
                            (m.running_var, want_rv, "running_var")):
        assert_close(got, want, **F64, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_torch_per_chunk(dtype):
    """Against PyTorch's own F.batch_norm called on each chunk (float32 state)."""
    shape, V = (11, 4, 3, 3), 3
    m = batchnorm.BatchNorm2d(4, virtual_batch_size=V)
    x = make_input(shape, dtype, torch.channels_last, seed=7, requires_grad=True)
    y = m(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.float().square().sum().backward()

    xr = x.detach().clone().requires_grad_(True)
    w = torch.ones(4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    chunks = xr.split(ghost_batch_sizes(11, V, 9))
    yr = torch.cat([F.batch_norm(c, None, None, w, b, True) for c in chunks])
    yr.float().square().sum().backward()
    stats = [torch.var_mean(c.float(), dim=(0, 2, 3)) for c in chunks]
    n = torch.tensor([c.shape[0] for c in chunks], dtype=torch.float32)[:, None] / 11
    mean = (n * torch.stack([s[1] for s in stats])).sum(0)
    var = (n * torch.stack([s[0] for s in stats])).sum(0)  # var_mean: unbiased by default
    rtol, atol = TOL[dtype]
    assert_close(y, yr, rtol, atol, name="out")
    assert_close(x.grad, xr.grad, rtol, 4 * atol, name="grad_input")
    assert_close(m.weight.grad, w.grad, 1e-2, 5e-2, name="grad_weight")
    assert_close(m.bias.grad, b.grad, 1e-2, 5e-2, name="grad_bias")
    assert_close(m.running_mean, 0.1 * mean, 1e-5, 1e-5, name="running_mean")
    assert_close(m.running_var, 0.9 + 0.1 * var, 1e-5, 1e-5, name="running_var")


def test_one_ghost_batch_is_plain_batch_norm():
    x = make_input((8, 3, 4, 4), seed=8, requires_grad=True)
    a, b = batchnorm.BatchNorm2d(3, virtual_batch_size=8), batchnorm.BatchNorm2d(3)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    assert torch.equal(a.running_mean, b.running_mean)
    assert torch.equal(a.running_var, b.running_var)


def test_ghost_statistics_differ_from_the_batch():
    # Ghost batches with shifted means: each is centred on its own, the batch is not.
    x = torch.cat([torch.randn(4, 2) + 5, torch.randn(4, 2) - 5])
    y = batchnorm.BatchNorm1d(2, virtual_batch_size=4)(x)
    assert_close(y[:4].mean(0), torch.zeros(2), 0, 1e-5, name="first ghost mean")
    assert_close(y[4:].mean(0), torch.zeros(2), 0, 1e-5, name="second ghost mean")
    plain = batchnorm.BatchNorm1d(2)(x)
    assert (plain[:4].mean(0) > 0.5).all()


def test_no_effect_in_eval_and_without_running_stats():
    m = batchnorm.BatchNorm2d(3, virtual_batch_size=2)
    plain = batchnorm.BatchNorm2d(3)
    m(make_input((6, 3, 2, 2), seed=9, offset=1.0))
    plain.load_state_dict(m.state_dict())
    m.eval()
    plain.eval()
    x = make_input((5, 3, 2, 2), seed=10)
    assert torch.equal(m(x), plain(x))
    assert m.num_batches_tracked.item() == 1
    # track_running_stats=False in eval uses the whole batch's statistics, no ghosts.
    a = batchnorm.BatchNorm2d(3, virtual_batch_size=2, track_running_stats=False).eval()
    b = batchnorm.BatchNorm2d(3, track_running_stats=False).eval()
    assert torch.equal(a(x), b(x))
    # ... and ghost statistics in training, with no buffers to update.
    a.train()
    ya = a(x)
    want = torch.cat([F.batch_norm(c, None, None, a.weight, a.bias, True)
                      for c in x.split([2, 2, 1])])
    assert_close(ya, want, 1e-5, 1e-5, name="training without running stats")


def test_remainder_rule():
    assert ghost_batch_sizes(8, 4) == [4, 4]
    assert ghost_batch_sizes(10, 4) == [4, 4, 2]
    assert ghost_batch_sizes(9, 4) == [4, 5]          # 1 value per channel: merged
    assert ghost_batch_sizes(9, 4, 2) == [4, 4, 1]    # 1 sample, 2 values: its own
    assert ghost_batch_sizes(5, 4) == [5]
    assert ghost_batch_sizes(3, 1, 4) == [1, 1, 1]
    assert ghost_batch_sizes(4, 4) == [4]


def test_empty_batch_behaves_as_plain_batch_norm():
    a, b = batchnorm.BatchNorm2d(3, virtual_batch_size=4), batchnorm.BatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2)
    assert a(x).shape == b(x).shape == x.shape
    assert torch.equal(a.running_mean, b.running_mean)
    assert a.num_batches_tracked.item() == b.num_batches_tracked.item()


def test_gradcheck_and_gradgradcheck():
    x = make_input((5, 2, 3), torch.float64, seed=11, requires_grad=True)
    w = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=2,
                                activation="silu")

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_repr_state_dict_lazy_and_copies():
    m = batchnorm.BatchNorm2d(3, virtual_batch_size=8)
    assert "virtual_batch_size=8" in repr(m)
    assert "virtual_batch_size" not in repr(batchnorm.BatchNorm2d(3))
    assert list(m.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    torch_bn = torch.nn.BatchNorm2d(3)
    m.load_state_dict(torch_bn.state_dict())
    lazy = batchnorm.LazyBatchNorm2d(virtual_batch_size=2)
    lazy(torch.randn(4, 3, 2, 2))
    assert type(lazy) is batchnorm.BatchNorm2d and lazy.virtual_batch_size == 2
    anyrank = batchnorm.BatchNorm(virtual_batch_size=2)
    anyrank(torch.randn(4, 3, 2, 2, 2, 2))
    assert anyrank.virtual_batch_size == 2 and anyrank.num_batches_tracked.item() == 1
    assert copy.deepcopy(m).virtual_batch_size == 8


@pytest.mark.parametrize("value,error,match", [
    (0, ValueError, "at least 1"), (-2, ValueError, "at least 1"),
    (2.0, TypeError, "positive int"), (True, TypeError, "positive int")])
def test_bad_virtual_batch_size_at_construction(value, error, match):
    with pytest.raises(error, match=match):
        batchnorm.BatchNorm2d(3, virtual_batch_size=value)


@pytest.mark.parametrize("shape,V,match", [
    ((4, 3, 2, 2), 5, "does not fit in a batch of 4"),
    ((6, 3), 1, "1 value per channel"),
])
def test_bad_virtual_batch_size_for_the_input_changes_nothing(shape, V, match):
    m = CLASSES[len(shape)](3, virtual_batch_size=V)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        m(torch.randn(shape))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    m.eval()
    m(torch.randn(shape))  # fine in eval: no ghost batches there


def test_bad_residual_and_check_finite_change_nothing():
    m = batchnorm.BatchNorm2d(3, virtual_batch_size=2, check_finite=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(6, 3, 2, 2)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        m(x, torch.randn(6, 3, 2, 1))
    x[5, 1, 0, 0] = float("nan")  # in the last ghost batch only
    with pytest.raises(ValueError, match="not finite"):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


class _NoTorchBatchNorm(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert "batch_norm" not in func.name(), f"PyTorch's {func.name()} was called"
        return func(*args, **(kwargs or {}))


def test_runs_without_torch_batch_norm():
    m = batchnorm.BatchNorm2d(3, virtual_batch_size=3, activation="relu")
    x = make_input((7, 3, 2, 2), requires_grad=True)
    with _NoTorchBatchNorm():
        m(x).sum().backward()
    assert x.grad is not None and m.num_batches_tracked.item() == 1
