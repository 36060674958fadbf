"""convert_batchnorm: ours <-> torch, sync, frozen, activation fusion; same outputs, same state."""

import copy
import pickle

import pytest
import torch
from helpers import assert_close
from tool_models import Branchy, bn_state, example, make, randomize, seq_net
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.tools import FusedActivation, convert_batchnorm

# float32 networks of a few layers: ours and PyTorch's BN round differently.
TOL = dict(rtol=1e-4, atol=1e-5)
NAMES = ["sequential", "branchy", "resnet"]
OURS = (batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d)
TORCH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bns(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (_BatchNorm, batchnorm.FrozenBatchNorm))]


def identities(model):
    """``id`` of every BN parameter and buffer, by name."""
    return {f"{n}.{k}": id(v) for n, m in bns(model)
            for k, v in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}


def check_same_computation(original, converted, x, train_steps=2):
    """Eval outputs equal; then ``train_steps`` training steps: outputs, gradients of the input
    and running statistics equal; then eval again. Runs on copies."""
    a, b = copy.deepcopy(original), copy.deepcopy(converted)
    a.eval(), b.eval()
    assert_close(b(x), a(x), **TOL, name="eval output")
    a.train(), b.train()
    for step in range(train_steps):
        xa = (x + step).requires_grad_()
        xb = (x + step).requires_grad_()
        ya, yb = a(xa), b(xb)
        assert_close(yb, ya, **TOL, name=f"train output, step {step}")
        ga, = torch.autograd.grad(ya.square().sum(), xa)
        gb, = torch.autograd.grad(yb.square().sum(), xb)
        assert_close(gb, ga, rtol=1e-4, atol=1e-4, name=f"input gradient, step {step}")
    sa, sb = bn_state(a), bn_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_close(sb[k], sa[k], **TOL, name=k)
    a.eval(), b.eval()
    assert_close(b(x), a(x), **TOL, name="eval output after training")


@pytest.mark.parametrize("name", NAMES)
def test_to_ours_and_back_keeps_objects_flags_and_outputs(name):
    model = make(name)
    model.blocks[0].bn2.eval() if name == "resnet" else None  # a layer in its own mode
    reference = copy.deepcopy(model)
    params_before = identities(model)
    flags = {n: m.training for n, m in model.named_modules()}
    keys = list(model.state_dict())
    ours = convert_batchnorm(model)
    assert ours is model
    layers = bns(ours)
    assert layers and all(type(m) in OURS for _, m in layers)
    assert identities(ours) == params_before  # the very Parameters and buffers
    assert {n: m.training for n, m in ours.named_modules()} == flags
    assert list(ours.state_dict()) == keys
    check_same_computation(reference, ours, example())

    back = convert_batchnorm(ours, to="torch")
    assert all(type(m) in TORCH for _, m in bns(back))
    assert all(not hasattr(m, "activation") for _, m in bns(back))
    assert identities(back) == params_before
    for k, v in reference.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_keeps_requires_grad_dtype_and_options():
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4, momentum=None, eps=1e-3),
                          nn.BatchNorm1d(4, affine=False), nn.BatchNorm1d(4, bias=False))
    model = model.double()
    model[1].weight.requires_grad_(False)
    convert_batchnorm(model)
    bn, plain, no_bias = model[1], model[2], model[3]
    assert isinstance(bn, batchnorm.BatchNorm1d) and bn.momentum is None and bn.eps == 1e-3
    assert not bn.weight.requires_grad and bn.bias.requires_grad
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
    assert plain.weight is None and plain.bias is None and not plain.affine
    assert no_bias.bias is None and no_bias.weight is not None


def test_to_sync_keeps_outputs_and_existing_groups():
    model = make("resnet")
    reference = copy.deepcopy(model)
    sentinel = object()
    model.blocks[0].bn1 = batchnorm.SyncBatchNorm(8, process_group=sentinel)
    model.blocks[0].bn1.load_state_dict(reference.blocks[0].bn1.state_dict())
    out = convert_batchnorm(model, to="sync")
    assert all(type(m) is batchnorm.SyncBatchNorm for _, m in bns(out))
    assert out.blocks[0].bn1.process_group is sentinel
    model.blocks[0].bn1.process_group = None
    check_same_computation(reference, out, example())  # no process group: plain BN
    back = convert_batchnorm(out, to="torch")
    assert all(type(m) is nn.SyncBatchNorm for _, m in bns(back))


def test_torch_sync_batchnorm_becomes_ours_with_its_group():
    layer = nn.SyncBatchNorm(4)
    layer.process_group = "group-a"
    model = nn.Sequential(layer)
    out = convert_batchnorm(model)
    assert type(out[0]) is batchnorm.SyncBatchNorm and out[0].process_group == "group-a"
    assert out[0].weight is layer.weight


@pytest.mark.parametrize("name", NAMES)
def test_to_frozen_keeps_eval_output_in_both_modes(name):
    model = make(name)
    reference = copy.deepcopy(model).eval()
    x = example()
    out = convert_batchnorm(model, to="frozen").train()
    layers = bns(out)
    assert layers and all(isinstance(m, batchnorm.FrozenBatchNorm) for _, m in layers)
    assert not any(p for _, m in layers for p in m.parameters())
    for mode in (True, False):
        out.train(mode)
        assert_close(out(x), reference(x), **TOL, name=f"frozen, train={mode}")


def test_fuse_in_sequential_same_outputs_and_reversible():
    model = randomize(seq_net())
    model.append(nn.Hardswish())  # not ours to fuse: stays
    relu = model[2]
    reference = copy.deepcopy(model)
    out = convert_batchnorm(model, fuse_activation=True)
    assert [getattr(out[i], "activation", None) for i in (1, 4, 7, 12)] == \
        ["relu", "leaky_relu", "silu", "tanh"]
    assert out[4].negative_slope == 0.2
    assert all(isinstance(out[i], FusedActivation) for i in (2, 5, 8, 13))
    assert type(out[14]) is nn.Hardswish
    check_same_computation(reference, out, example())
    back = convert_batchnorm(out, to="torch")
    assert back[2] is relu and type(back[5]) is nn.LeakyReLU and back[5].negative_slope == 0.2
    assert all(type(back[i]) in TORCH for i in (1, 4, 7, 12))
    check_same_computation(reference, back, example())


def test_fuse_skips_what_ours_cannot_compute_or_cannot_fuse_safely():
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(
        nn.Sequential(nn.BatchNorm1d(3), nn.GELU(approximate="tanh")),
        nn.Sequential(nn.BatchNorm1d(3), nn.ReLU6()),
        nn.Sequential(shared, nn.ReLU()),
        nn.Sequential(shared),  # the same layer, elsewhere without the ReLU
        nn.Sequential(nn.BatchNorm1d(3), nn.GELU()),  # exact GELU: ours
    )
    convert_batchnorm(model, fuse_activation=True)
    assert model[0][0].activation is None and type(model[0][1]) is nn.GELU
    assert model[1][0].activation is None
    assert model[2][0].activation is None and type(model[2][1]) is nn.ReLU
    assert model[4][0].activation == "gelu"


def test_fuse_fx_leaves_the_model_alone_and_rewrites_the_graph():
    model = randomize(Branchy())
    reference = copy.deepcopy(model)
    gm = convert_batchnorm(model, fuse_activation="fx")
    assert isinstance(gm, fx.GraphModule)
    assert all(type(m) in TORCH for _, m in bns(model))  # the model passed in is unchanged
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    acts = {n: (m.activation, m.negative_slope) for n, m in bns(gm)}
    assert acts == {"bn": ("leaky_relu", 0.1), "bn1": ("sigmoid", 0.01),
                    "bn3": ("relu", 0.01), "bn_twice": (None, 0.01)}
    targets = {(n.op, n.target) for n in gm.graph.nodes}
    assert ("call_method", "relu") not in targets
    assert ("call_function", torch.sigmoid) not in targets
    assert ("call_function", torch.tanh) in targets  # bn_twice's output goes to two places
    check_same_computation(reference, gm, example(size=6))

    back = convert_batchnorm(gm, to="torch")
    assert all(type(m) in TORCH for _, m in bns(back))
    check_same_computation(reference, back, example(size=6))


def test_fuse_true_on_a_graph_module_rewrites_it_in_place():
    gm = fx.symbolic_trace(randomize(Branchy()))
    reference = copy.deepcopy(gm)
    out = convert_batchnorm(gm, fuse_activation=True)
    assert out is gm and gm.bn.activation == "leaky_relu"
    check_same_computation(reference, gm, example(size=6))


def test_fused_activation_survives_pickle_and_deepcopy():
    model = convert_batchnorm(randomize(seq_net()), fuse_activation=True).eval()
    x = example()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_close(clone(x), model(x), rtol=0, atol=0)
        assert type(convert_batchnorm(clone, to="torch")[2]) is nn.ReLU


def test_to_torch_refuses_what_torch_cannot_hold():
    model = nn.Sequential(batchnorm.BatchNorm2d(3, activation="relu"),
                          batchnorm.BatchRenorm2d(3), batchnorm.FrozenBatchNorm2d(3),
                          batchnorm.BatchNorm2d(3, virtual_batch_size=2),
                          batchnorm.BatchNorm(3), batchnorm.BatchNorm2d(3))
    before = copy.deepcopy(model)
    with pytest.raises(TypeError) as info:
        convert_batchnorm(model, to="torch")
    message = str(info.value)
    for name, words in (("0", "fused activation ('relu')"), ("1", "BatchRenorm2d"),
                        ("2", "frozen"), ("3", "ghost batches"), ("4", "rank-agnostic")):
        assert f"{name} " in message and words in message, (name, message)
    assert "5 " not in message
    assert [type(m) for m in model] == [type(m) for m in before]  # nothing changed
    out = convert_batchnorm(model, to="torch", unknown="skip")
    assert [type(m) for m in out][:5] == [type(m) for m in before][:5]
    assert type(out[5]) is nn.BatchNorm2d


def test_unknown_subclass_is_named_and_nothing_changes():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(MyBN(3)), nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match=r"1\.0 is a .*MyBN.*; 2 is lazy and not initialised"):
        convert_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d
    out = convert_batchnorm(model, unknown="skip")
    assert type(out[0]) is batchnorm.BatchNorm2d and type(out[1][0]) is MyBN
    with pytest.raises(TypeError, match="MyBN"):
        convert_batchnorm(nn.Sequential(MyBN(3)), to="sync")
    with pytest.raises(TypeError, match="MyBN"):
        convert_batchnorm(nn.Sequential(MyBN(3)), to="frozen")


def test_frozen_target_refuses_layers_without_statistics():
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match="0 has no running statistics"):
        convert_batchnorm(model, to="frozen")
    assert type(model[1]) is nn.BatchNorm1d
    out = convert_batchnorm(model, to="frozen", unknown="skip")
    assert type(out[0]) is nn.BatchNorm1d  # left as it was: not converted to ours either
    assert type(out[1]) is batchnorm.FrozenBatchNorm1d


def test_timm_style_bn_act_and_torchvision_style_frozen():
    class BatchNormAct2d(nn.BatchNorm2d):  # timm's layout: BN state, then drop and act
        def __init__(self, c, act):
            super().__init__(c)
            self.drop, self.act = nn.Identity(), act

        def forward(self, x):
            return self.act(self.drop(super().forward(x)))

    class FrozenBatchNorm2d(nn.Module):  # torchvision's layout
        def __init__(self, c):
            super().__init__()
            for k, v in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)),
                         ("running_mean", torch.randn(c)), ("running_var", torch.rand(c) + 0.5)):
                self.register_buffer(k, v)
            self.eps = 1e-5

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    model = randomize(nn.Sequential(BatchNormAct2d(3, nn.SiLU()), FrozenBatchNorm2d(3),
                                    BatchNormAct2d(3, nn.Identity())))
    reference = copy.deepcopy(model)
    out = convert_batchnorm(model)
    assert type(out[0]) is batchnorm.BatchNorm2d and out[0].activation == "silu"
    assert type(out[1]) is batchnorm.FrozenBatchNorm2d
    assert out[2].activation is None
    check_same_computation(reference, out, example())

    bad = nn.Sequential(BatchNormAct2d(3, nn.Hardswish()))
    with pytest.raises(TypeError, match="activation ours cannot fuse"):
        convert_batchnorm(bad)
    bad[0].act, bad[0].drop = nn.ReLU(), nn.Dropout()
    with pytest.raises(TypeError, match="drop layer"):
        convert_batchnorm(bad)


def test_single_layer_shared_layers_and_bad_arguments():
    layer = nn.BatchNorm2d(3)
    new = convert_batchnorm(layer)
    assert type(new) is batchnorm.BatchNorm2d and new.weight is layer.weight
    shared = nn.BatchNorm1d(2)
    model = nn.Sequential(shared, nn.Sequential(shared))
    convert_batchnorm(model)
    assert model[0] is model[1][0] and type(model[0]) is batchnorm.BatchNorm1d

    with pytest.raises(ValueError, match="has no batch-norm layer"):
        convert_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="to must be one of"):
        convert_batchnorm(model, to="keras")
    with pytest.raises(ValueError, match="to='torch' cannot hold"):
        convert_batchnorm(model, to="torch", fuse_activation=True)
    with pytest.raises(ValueError, match="fuse_activation must be"):
        convert_batchnorm(model, fuse_activation="yes")
    with pytest.raises(ValueError, match="unknown must be"):
        convert_batchnorm(model, unknown="ignore")
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        convert_batchnorm("resnet18")


def test_fx_fusion_of_an_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else x

    with pytest.raises(TypeError, match="cannot be traced with torch.fx"):
        convert_batchnorm(DataDependent(), fuse_activation="fx")


def test_fx_fusion_looks_through_identities():
    class Block(nn.Module):  # timm's BasicBlock: bn1 -> drop_block (Identity) -> act1
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.drop_block = nn.Identity()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.drop_block(self.bn(x)))

    model = randomize(Block())
    gm = convert_batchnorm(model, fuse_activation="fx")
    assert gm.bn.activation == "relu"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["bn", "drop_block"]
    check_same_computation(model, gm, example())
