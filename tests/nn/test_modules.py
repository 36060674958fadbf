"""Drop-in behaviour of the modules beyond the numbers: state, repr, lifecycle."""

import copy
import pickle

import pytest
import torch
from helpers import assert_close, make_input

import batchnorm
from batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormalization

PAIRS = [(BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)),
         (BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 5)),
         (BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 3, 3, 3))]


def _train_steps(module, shape, steps=2):
    module.train()
    for s in range(steps):
        module(make_input(shape, seed=s, offset=s))


@pytest.mark.parametrize("ours,theirs,shape", PAIRS)
@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(track_running_stats=False),
                                    dict(momentum=None), dict(eps=1e-3, bias=False)])
def test_constructor_state_and_repr_match_torch(ours, theirs, shape, kwargs):
    a, b = ours(3, **kwargs), theirs(3, **kwargs)
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()]
    assert isinstance(a, theirs)


@pytest.mark.parametrize("ours,theirs,shape", PAIRS)
def test_state_dict_both_ways(ours, theirs, shape):
    src = theirs(3)
    _train_steps(src, shape)
    dst = ours(3)
    dst.load_state_dict(src.state_dict())
    back = theirs(3)
    _train_steps(dst, shape, steps=1)
    back.load_state_dict(dst.state_dict())
    _train_steps(src, shape, steps=1)  # same third batch on torch's module
    for k, v in back.state_dict().items():
        assert_close(v, src.state_dict()[k], 1e-6, 1e-6, name=k)
    dst.eval()
    src.eval()
    x = make_input(shape, seed=9)
    assert_close(dst(x), src(x), 1e-5, 1e-5, name="eval output")


def test_old_checkpoint_without_num_batches_tracked_loads():
    old = torch.nn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1  # what a checkpoint saved before torch 0.4.1 carries
    m = BatchNorm2d(3)
    m.load_state_dict(old)
    assert m.num_batches_tracked.item() == 0
    fresh = dict(old)  # no metadata at all: treated as an old version too
    BatchNorm2d(3).load_state_dict(fresh)


def test_reset_parameters_and_running_stats():
    m = BatchNorm2d(3)
    _train_steps(m, (4, 3, 2, 2))
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(3)) and torch.equal(m.bias, torch.zeros(3))
    assert torch.equal(m.running_mean, torch.zeros(3)) and m.num_batches_tracked.item() == 0


def test_track_running_stats_toggled_after_construction_matches_torch():
    a, b = BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for m in (a, b):
        _train_steps(m, (4, 3, 2, 2))
        m.track_running_stats = False
    x = make_input((4, 3, 2, 2), seed=5, offset=3)
    for training in (True, False):
        a.train(training)
        b.train(training)
        assert_close(a(x), b(x), 1e-5, 1e-5, name=f"training={training}")
        assert_close(a.running_mean, b.running_mean, 1e-6, 1e-6, name="running_mean")
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item()


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_memory_format_kept(fmt):
    m = BatchNorm2d(3, activation="relu")
    x = make_input((4, 3, 5, 5), memory_format=fmt, requires_grad=True)
    y = m(x, residual=torch.randn(4, 3, 5, 5).contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt)
    y.backward(torch.ones_like(y))
    assert x.grad.is_contiguous(memory_format=fmt)
    m3 = BatchNorm3d(3)
    x3 = make_input((2, 3, 3, 3, 3), memory_format=torch.channels_last_3d)
    assert m3(x3).is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_float32_state(dtype):
    m = BatchNorm2d(3)
    x = make_input((4, 3, 5, 5), dtype, requires_grad=True)
    y = m(x)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert m.weight.grad.dtype == torch.float32 and m.running_mean.dtype == torch.float32


def test_device_and_dtype_factory_arguments():
    m = BatchNorm2d(3, device="meta", dtype=torch.float64)
    assert m.weight.device.type == "meta" and m.running_var.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long


def test_deepcopy_and_pickle_keep_state_and_extras():
    m = BatchNorm2d(3, activation="leaky_relu", negative_slope=0.2, momentum=None)
    _train_steps(m, (4, 3, 2, 2))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone.activation == "leaky_relu" and clone.negative_slope == 0.2
        for k, v in m.state_dict().items():
            assert torch.equal(v, clone.state_dict()[k]), k
        x = make_input((4, 3, 2, 2), seed=7)
        m.eval()
        clone.eval()
        assert torch.equal(m(x), clone(x))
        m.train()


def test_extra_repr_names_our_additions():
    assert "activation='relu'" in repr(BatchNorm2d(3, activation="relu"))
    assert "negative_slope=0.2" in repr(BatchNorm1d(3, activation="leaky_relu",
                                                    negative_slope=0.2))
    assert "backend='torch'" in repr(BatchNorm2d(3, backend="torch"))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        BatchNorm2d(3, activation="swish")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        BatchNorm2d(3, backend="cuda")


@pytest.mark.parametrize("lazy,plain,shape", [
    (batchnorm.LazyBatchNorm1d, BatchNorm1d, (4, 6)),
    (batchnorm.LazyBatchNorm2d, BatchNorm2d, (4, 6, 3, 3)),
    (batchnorm.LazyBatchNorm3d, BatchNorm3d, (2, 6, 2, 2, 2)),
])
def test_lazy_modules_become_ours(lazy, plain, shape):
    m = lazy(activation="relu", momentum=None)
    torch_lazy = getattr(torch.nn, lazy.__name__)(momentum=None)
    x = make_input(shape)
    y = m(x)
    assert type(m) is plain and m.num_features == 6 and m.activation == "relu"
    assert_close(y, torch.relu(torch_lazy(x)), 1e-5, 1e-5, name="output")
    assert_close(m.running_var, torch_lazy.running_var, 1e-6, 1e-6, name="running_var")


def test_lazy_without_bias():
    m = batchnorm.LazyBatchNorm2d(bias=False)
    m(make_input((2, 4, 3, 3)))
    assert m.bias is None and m.weight.shape == (4,)


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 2), (4, 3, 2, 2), (2, 3, 2, 2, 2),
                                   (2, 3, 2, 1, 2, 2)])
def test_rank_agnostic_batchnorm(shape):
    lazy, sized = BatchNorm(dtype=torch.float64), BatchNorm(3, dtype=torch.float64)
    x = make_input(shape, torch.float64)
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert_close(lazy(x), ref, 1e-10, 1e-10, name="lazy")
    assert_close(sized(x), ref, 1e-10, 1e-10, name="sized")
    assert lazy.num_features == 3 and type(lazy) is BatchNorm
    assert list(lazy.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        sized(torch.randn(3))


def test_keras_names_map_to_torch():
    k = BatchNormalization(dtype=torch.float64)
    assert k.momentum == pytest.approx(0.01) and k.eps == 1e-3
    x = make_input((6, 5, 4), torch.float64)  # (N, steps, channels): axis=-1
    y = k(x)
    ref = torch.nn.functional.batch_norm(x.movedim(-1, 1), None, None, training=True, eps=1e-3)
    assert_close(y, ref.movedim(1, -1), 1e-10, 1e-10, name="axis=-1")
    assert k.num_features == 4
    unbiased = x.movedim(-1, 1).var(dim=(0, 2))
    assert_close(k.running_var, 0.99 + 0.01 * unbiased, 1e-10, 1e-10, name="moving variance")


def test_keras_center_scale_and_axis1():
    k = BatchNormalization(axis=1, center=False, scale=True, dtype=torch.float64)
    x = make_input((4, 3, 2, 2), torch.float64)
    k(x)
    assert k.bias is None and k.weight.shape == (3,)
    only_center = BatchNormalization(axis=1, scale=False)
    only_center(make_input((4, 3, 2, 2)))
    assert only_center.weight is None and only_center.bias.shape == (3,)
    assert "center=True, scale=False" in repr(only_center)
    with pytest.raises(ValueError, match="batch axis"):
        BatchNormalization(axis=0)
    lazy = BatchNormalization(axis=-2)
    with pytest.raises(ValueError, match="batch axis"):
        lazy(make_input((4, 3)))  # -2 is axis 0 of a 2D input
    assert lazy.has_uninitialized_params()  # the failed call changed nothing


def test_eval_mode_uses_running_stats_and_ignores_batch():
    m = BatchNorm2d(3)
    _train_steps(m, (8, 3, 4, 4), steps=3)
    m.eval()
    x = make_input((8, 3, 4, 4), seed=42)
    single = m(x[:1])
    assert_close(single, m(x)[:1], 1e-6, 1e-6, name="one sample vs batch")


@pytest.mark.parametrize("ours,theirs,shape", PAIRS)
def test_empty_batch_matches_torch(ours, theirs, shape):
    a, b = ours(3), theirs(3)
    x = torch.randn(0, *shape[1:], requires_grad=True)
    ya, yb = a(x), b(x)
    assert ya.shape == yb.shape == x.shape
    ya.sum().backward()
    assert torch.equal(a.weight.grad, torch.zeros(3))
    assert torch.equal(a.running_mean, b.running_mean)
    assert torch.equal(a.running_var, b.running_var)
    assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 1
