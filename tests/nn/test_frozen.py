"""Frozen batch norm against folding by hand; checkpoints of torchvision, detectron2, torch.nn."""

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from helpers import assert_close, make_input, memory_format_for
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
from batchnorm import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    convert_frozen_batchnorm,
)

F64 = dict(rtol=1e-10, atol=1e-10)
FROZEN = {2: FrozenBatchNorm1d, 3: FrozenBatchNorm1d, 4: FrozenBatchNorm2d, 5: FrozenBatchNorm3d}
BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _buffers(C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(weight=torch.randn(C, generator=g, dtype=dtype),
                       bias=torch.randn(C, generator=g, dtype=dtype),
                       running_mean=torch.randn(C, generator=g, dtype=dtype) * 3,
                       running_var=torch.rand(C, generator=g, dtype=dtype) * 2 + 0.1)


def _fold_by_hand(x, buf, eps):
    view = [1, -1] + [1] * (x.dim() - 2)
    scale = buf["weight"] / torch.sqrt(buf["running_var"] + eps)
    shift = buf["bias"] - buf["running_mean"] * scale
    return x * scale.view(view) + shift.view(view), scale.view(view)


@pytest.mark.parametrize("shape,channels_last", [((5, 3), False), ((4, 6, 7), False),
                                                 ((3, 4, 5, 5), False), ((3, 4, 5, 5), True),
                                                 ((2, 65, 1, 1), True), ((2, 3, 2, 3, 4), True),
                                                 ((2, 1, 3), False)])
@pytest.mark.parametrize("training", [False, True])
def test_matches_folding_by_hand_with_input_gradient(shape, channels_last, training):
    C = shape[1]
    m = FROZEN[len(shape)](C, eps=1e-3, dtype=torch.float64)
    buf = _buffers(C)
    m.load_state_dict(buf)
    m.train(training)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fmt = memory_format_for(len(shape), channels_last)
    x = make_input(shape, torch.float64, fmt, seed=1, requires_grad=True)
    y = m(x)
    want, scale = _fold_by_hand(x.detach(), buf, 1e-3)
    assert_close(y, want, **F64, name="out")
    assert y.is_contiguous(memory_format=fmt)
    dy = make_input(shape, torch.float64, seed=2)
    (gx,) = torch.autograd.grad(y, x, dy)
    assert_close(gx, dy * scale, **F64, name="grad_input")
    assert gx.is_contiguous(memory_format=fmt)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in {'train' if training else 'eval'}"
    scale_, shift_ = m.scale_shift()
    assert_close(scale_, scale.flatten(), **F64, name="scale_shift scale")


def test_no_parameters_and_train_changes_nothing():
    m = FrozenBatchNorm2d(3)
    m.load_state_dict(_buffers(3, torch.float32))
    assert list(m.parameters()) == [] and [n for n, _ in m.named_buffers()] == [
        "weight", "bias", "running_mean", "running_var"]
    x = make_input((4, 3, 2, 2), seed=3)
    y_eval = m.eval()(x)
    y_train = m.train()(x)
    assert torch.equal(y_eval, y_train)
    assert not any(b.requires_grad for b in m.buffers())


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_fused_activation_and_residual(activation):
    m = FrozenBatchNorm2d(3, dtype=torch.float64, activation=activation)
    buf = _buffers(3)
    m.load_state_dict(buf)
    x = make_input((2, 3, 4, 4), torch.float64, seed=4, requires_grad=True)
    r = make_input((2, 3, 4, 4), torch.float64, seed=5, requires_grad=True)
    act = {"relu": torch.relu, "silu": torch.nn.functional.silu}[activation]
    y = m(x, r)
    want = act(_fold_by_hand(x, buf, 1e-5)[0] + r)
    assert_close(y, want, **F64, name="out")
    dy = make_input((2, 3, 4, 4), torch.float64, seed=6)
    for g, h in zip(torch.autograd.grad(y, (x, r), dy), torch.autograd.grad(want, (x, r), dy),
                    strict=True):
        assert_close(g, h, **F64, name="grad")


def _trained(module, shape, steps=2):
    module.train()
    for s in range(steps):
        module(make_input(shape, seed=s, offset=s, scale=1 + s))
    return module.eval()


SOURCES = [
    (lambda: batchnorm.BatchNorm2d(3), (4, 3, 3, 3), FrozenBatchNorm2d),
    (lambda: nn.BatchNorm2d(3), (4, 3, 3, 3), FrozenBatchNorm2d),
    (lambda: nn.BatchNorm1d(3, affine=False), (6, 3), FrozenBatchNorm1d),
    (lambda: batchnorm.BatchNorm1d(3, bias=False, eps=1e-3), (4, 3, 5), FrozenBatchNorm1d),
    (lambda: nn.BatchNorm3d(3, momentum=None), (2, 3, 2, 2, 2), FrozenBatchNorm3d),
    (lambda: batchnorm.BatchNorm2d(3, activation="relu"), (4, 3, 3, 3), FrozenBatchNorm2d),
    (lambda: batchnorm.BatchRenorm2d(3, warmup_steps=0, relax_steps=0), (4, 3, 3, 3),
     FrozenBatchNorm2d),
    (lambda: batchnorm.BatchNorm2d(3, virtual_batch_size=2), (4, 3, 3, 3), FrozenBatchNorm2d),
    (lambda: batchnorm.BatchNorm(), (4, 3, 2, 2, 2, 2), FrozenBatchNorm),
]


@pytest.mark.parametrize("make,shape,frozen_cls", SOURCES)
def test_from_batchnorm_and_convert_keep_the_eval_output(make, shape, frozen_cls):
    bn = _trained(make(), shape)
    x = make_input(shape, seed=7, requires_grad=True)
    want = bn(x)
    frozen = frozen_cls.from_batchnorm(bn)
    model = convert_frozen_batchnorm(nn.Sequential(copy.deepcopy(bn)))
    assert type(model[0]) is frozen_cls
    for m in (frozen, model[0]):
        m.train()  # frozen: the mode does not matter
        assert_close(m(x), want, 1e-6, 1e-6, name=type(bn).__name__)
        assert m.eps == bn.eps and m.activation == getattr(bn, "activation", None)
    (g1,) = torch.autograd.grad(frozen(x).sum(), x)
    (g2,) = torch.autograd.grad(bn(x).sum(), x)
    assert_close(g1, g2, 1e-6, 1e-6, name="grad_input")
    with torch.no_grad():  # copied, not shared
        bn.running_mean.add_(1.0)
    assert not torch.equal(frozen.running_mean, bn.running_mean)


def test_convert_a_model_and_sync_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="relu"),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5),
                          nn.Sequential(nn.Linear(5, 2), nn.SyncBatchNorm(2)))
    model.train()
    model(torch.randn(8, 3, 6, 6))  # SyncBatchNorm trains as BN without a process group
    model.eval()
    x = torch.randn(3, 3, 6, 6)
    want = model(x)
    frozen = convert_frozen_batchnorm(model)
    assert frozen is model
    assert [type(m).__name__ for m in (model[1], model[4], model[5][1])] == [
        "FrozenBatchNorm2d", "FrozenBatchNorm1d", "FrozenBatchNorm"]
    model.train()
    assert_close(model(x), want, 1e-5, 1e-5, name="converted model")
    assert [list(m.parameters()) for m in (model[1], model[4], model[5][1])] == [[], [], []]
    assert isinstance(convert_frozen_batchnorm(nn.BatchNorm2d(2)), FrozenBatchNorm2d)



class _BatchNormAct(nn.BatchNorm2d):
    """Shaped like timm's BatchNormAct2d: a BatchNorm2d subclass with an ``act`` child."""

    def __init__(self, C):
        super().__init__(C)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


def test_a_layer_with_submodules_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(_BatchNormAct(3)))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"_BatchNormAct has submodules \(act\).*to='frozen'"):
        convert_frozen_batchnorm(model)
    assert [type(m) for m in model.modules()] == before  # the first layer was not swapped


def test_an_error_on_a_later_layer_changes_nothing():
    model = nn.Sequential(nn.BatchNorm2d(3), batchnorm.BatchNormalization())
    with pytest.raises(ValueError, match="normalizes axis -1"):
        convert_frozen_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d

class _TorchvisionStyle(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d as documented: four buffers, eps=1e-5, version 1."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, fill(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(
            1, -1, 1, 1)


def _with_version(sd, version):
    sd = OrderedDict(sd)
    sd._metadata = OrderedDict({"": {"version": version}})
    return sd


def test_loads_torchvision_and_back():
    tv = _TorchvisionStyle(4)
    tv.load_state_dict(_buffers(4, torch.float32, seed=1))
    ours = FrozenBatchNorm2d(4)
    ours.load_state_dict(tv.state_dict())  # strict
    x = make_input((2, 4, 3, 3), seed=8)
    assert_close(ours(x), tv(x), 1e-5, 1e-5, name="torchvision -> ours")
    back = _TorchvisionStyle(4)
    back.load_state_dict(ours.state_dict())
    assert_close(back(x), tv(x), 0, 0, name="ours -> torchvision")
    assert repr(ours) == "FrozenBatchNorm2d(4, eps=1e-05)"  # torchvision's repr


def test_loads_detectron2_checkpoints():
    buf = _buffers(4, torch.float32, seed=2)
    x = make_input((2, 4, 3, 3), seed=9)
    want = _fold_by_hand(x, buf, 1e-5)[0]
    v3 = FrozenBatchNorm2d(4)
    v3.load_state_dict(_with_version(buf, 3))  # detectron2 today: version 3, same buffers
    assert_close(v3(x), want, 1e-5, 1e-5, name="version 3")
    # Caffe2-converted / early checkpoints: weight and bias only, no metadata or version 1.
    for sd in (OrderedDict(weight=buf["weight"], bias=buf["bias"]),
               _with_version(OrderedDict(weight=buf["weight"], bias=buf["bias"]), 1)):
        m = FrozenBatchNorm2d(4)
        m.load_state_dict(sd)
        assert torch.equal(m.running_mean, torch.zeros(4))
        assert torch.equal(m.running_var, torch.ones(4))
        assert_close(m(x), x * (buf["weight"] / (1 + 1e-5) ** 0.5).view(1, -1, 1, 1)
                     + buf["bias"].view(1, -1, 1, 1), 1e-5, 1e-5, name="weight/bias only")


def test_batchnorm_checkpoints_both_ways():
    bn = _trained(nn.BatchNorm2d(3), (4, 3, 2, 2))
    sd = bn.state_dict()
    assert "num_batches_tracked" in sd and sd._metadata[""]["version"] == 2
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict(sd)  # strict: num_batches_tracked dropped
    x = make_input((2, 3, 2, 2), seed=10)
    assert_close(frozen(x), bn(x), 1e-6, 1e-6, name="BN -> frozen")
    back = nn.BatchNorm2d(3)
    back.load_state_dict(frozen.state_dict())  # strict: torch fills num_batches_tracked
    assert back.num_batches_tracked.item() == 0
    assert_close(back.eval()(x), bn(x), 0, 0, name="frozen -> BN")
    # A BN without running statistics has nothing to freeze.
    with pytest.raises(RuntimeError, match="Missing key"):
        FrozenBatchNorm2d(3).load_state_dict(nn.BatchNorm2d(3, track_running_stats=False)
                                             .state_dict())


def test_low_precision_inputs_and_half_module():
    m = FrozenBatchNorm2d(3)
    m.load_state_dict(_buffers(3, torch.float32, seed=3))
    x = make_input((2, 3, 4, 4), torch.bfloat16, torch.channels_last, seed=11)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, m(x.float()), 1e-2, 5e-2, name="bf16")
    h = copy.deepcopy(m).half()
    assert_close(h(x.half()), m(x.float()), 1e-2, 5e-2, name="fp16 module")


def test_copies_and_pickle():
    m = FrozenBatchNorm2d(3, activation="leaky_relu", negative_slope=0.2)
    m.load_state_dict(_buffers(3, torch.float32, seed=4))
    x = make_input((2, 3, 2, 2), seed=12)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(x), m(x))
    assert "activation='leaky_relu', negative_slope=0.2" in repr(m)


@pytest.mark.parametrize("cls,shape,match", [
    (FrozenBatchNorm2d, (2, 3, 4), "expected 4D input \\(got 3D input\\)"),
    (FrozenBatchNorm1d, (2, 3, 4, 4), "expected 2D or 3D input \\(got 4D input\\)"),
    (FrozenBatchNorm3d, (2, 3, 4, 4), "expected 5D input \\(got 4D input\\)"),
    (FrozenBatchNorm, (3,), "expected at least 2D input"),
])
def test_wrong_rank_matches_torch_and_changes_nothing(cls, shape, match):
    m = cls(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        m(torch.randn(shape))
    with pytest.raises(RuntimeError, match="should contain 4 elements not 3"):
        FrozenBatchNorm(3)(torch.randn(2, 4, 2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_sources_and_arguments():
    with pytest.raises(ValueError, match="no running statistics"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="lazy and not initialized"):
        FrozenBatchNorm2d.from_batchnorm(nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="normalizes axis -1"):
        convert_frozen_batchnorm(nn.Sequential(batchnorm.BatchNormalization()))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        FrozenBatchNorm2d(3, activation="swish")
    with pytest.raises(ValueError, match="unknown backend"):
        FrozenBatchNorm2d(3, backend="gpu")
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm2d(-1)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        FrozenBatchNorm2d(3, eps=-1.0)


class _NoTorchBatchNorm(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert "batch_norm" not in func.name(), f"PyTorch's {func.name()} was called"
        return func(*args, **(kwargs or {}))


def test_runs_without_torch_batch_norm():
    m = FrozenBatchNorm2d(3, activation="relu")
    x = make_input((2, 3, 2, 2), requires_grad=True)
    with _NoTorchBatchNorm():
        m(x).sum().backward()
    assert x.grad is not None
