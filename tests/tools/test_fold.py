"""fold_batchnorm: the tensor formula against float64 by hand, every layer kind, whole models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from tool_models import SmallResNet, example, make, randomize, seq_net
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.tools import fold_batchnorm, fold_conv_bn, fold_conv_bn_weights
from batchnorm.tools._common import is_batchnorm

F64 = dict(rtol=1e-10, atol=1e-10)
F32 = dict(rtol=1e-4, atol=1e-5)  # a folded network rounds in other places


def bn_for(C, dtype=torch.float64, seed=0, affine=True):
    bn = nn.BatchNorm1d(C, affine=affine, eps=1e-3, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=dtype) * 2)
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=dtype) * 3 + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(C, generator=g, dtype=dtype))
            bn.bias.copy_(torch.randn(C, generator=g, dtype=dtype))
    return bn.eval()


LAYERS = {
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, bias=b), (2, 4, 9)),
    "conv2d-groups": (lambda b: nn.Conv2d(6, 9, 3, groups=3, bias=b), (2, 6, 7, 7)),
    "conv2d-depthwise": (lambda b: nn.Conv2d(5, 5, 3, groups=5, bias=b), (2, 5, 6, 6)),
    "conv3d": (lambda b: nn.Conv3d(2, 4, 2, bias=b), (2, 2, 4, 4, 4)),
    "convT1d": (lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, bias=b), (2, 4, 5)),
    "convT2d-groups": (lambda b: nn.ConvTranspose2d(6, 9, 3, groups=3, bias=b), (2, 6, 5, 5)),
    "convT2d-groups-2": (lambda b: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=b),
                         (2, 4, 3, 3)),
    "convT3d": (lambda b: nn.ConvTranspose3d(2, 3, 2, bias=b), (1, 2, 3, 3, 3)),
    "linear": (lambda b: nn.Linear(7, 5, bias=b), (6, 7)),
}


def by_hand(layer, bn, x):
    """``bn(layer(x))`` in inference mode, written out in float64."""
    y = layer(x)
    view = [1, -1] + [1] * (y.dim() - 2)
    w = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    b = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return ((y - bn.running_mean.view(view)) / torch.sqrt(bn.running_var.view(view) + bn.eps)
            * w.view(view) + b.view(view))


def run(layer, w, b, x):
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
              groups=layer.groups)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[x.dim() - 2]
        return fn(x, w, b, output_padding=layer.output_padding, **kw)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    return fn(x, w, b, **kw)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_weights_formula_matches_float64_by_hand(kind, bias, affine):
    make_layer, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make_layer(bias).double()
    C = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = bn_for(C, affine=affine)
    x = torch.randn(shape, dtype=torch.float64)
    w, b = fold_conv_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                bn.eps, bn.weight, bn.bias,
                                transposed=isinstance(layer, nn.modules.conv._ConvTransposeNd),
                                groups=getattr(layer, "groups", 1))
    assert w.shape == layer.weight.shape and b.shape == (C,) and not w.requires_grad
    assert_close(run(layer, w, b, x), by_hand(layer, bn, x), **F64, name=kind)


@pytest.mark.parametrize("kind", LAYERS)
def test_fold_conv_bn_float32_copy(kind):
    make_layer, shape = LAYERS[kind]
    torch.manual_seed(1)
    layer = make_layer(True)
    C = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = bn_for(C, dtype=torch.float32)
    layer.bias.requires_grad_(False)
    before = layer.weight.detach().clone()
    x = torch.randn(shape)
    folded = fold_conv_bn(layer, bn)
    assert folded is not layer and torch.equal(layer.weight, before)
    assert folded.weight.requires_grad and not folded.bias.requires_grad
    with torch.no_grad():
        assert_close(folded(x), by_hand(layer, bn, x), **F32, name=kind)


def test_weights_formula_rejects_mismatched_channels_and_groups():
    w = torch.randn(6, 2, 3)
    stats = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="running_mean has shape \\(4,\\); the layer has 6"):
        fold_conv_bn_weights(w, None, *stats, 1e-5)
    with pytest.raises(ValueError, match="does not split into 4 groups"):
        fold_conv_bn_weights(w, None, torch.zeros(8), torch.ones(8), 1e-5, transposed=True,
                             groups=4)
    with pytest.raises(ValueError, match="follows a MaxPool2d"):
        fold_conv_bn(nn.MaxPool2d(2), nn.BatchNorm2d(3).eval())
    with pytest.raises(ValueError, match="has 4 channels; the Conv2d before it has 3"):
        fold_conv_bn(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match="training mode"):
        fold_conv_bn(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))


def test_channels_last_weight_keeps_its_layout():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    folded = fold_conv_bn(conv, bn_for(4, dtype=torch.float32))
    assert folded.weight.is_contiguous(memory_format=torch.channels_last)


def test_sequential_in_place_activations_stay_as_modules():
    model = randomize(seq_net(bn=batchnorm.BatchNorm2d)).eval()
    model[4].activation, model[4].negative_slope = "leaky_relu", 0.3  # fused: module after
    model[5] = nn.Identity()
    x = example()
    with torch.no_grad():
        want = model(x)
    out = fold_batchnorm(model)
    assert out is model
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "Identity", "ReLU", "Conv2d", "LeakyReLU", "Identity", "ConvTranspose2d",
        "Identity", "SiLU", "AdaptiveAvgPool2d", "Flatten", "Linear", "Identity", "Tanh"]
    assert model[4].negative_slope == 0.3 and model[0].bias is not None
    with torch.no_grad():
        assert_close(model(x), want, **F32, name="folded")


@pytest.mark.parametrize("name", ["branchy", "resnet"])
def test_traced_models_fold_everything_foldable(name):
    model = make(name).eval()
    x = example(size=6)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        want = model(x)
    out = fold_batchnorm(model, strict=(name == "resnet"))
    assert isinstance(out, fx.GraphModule)
    left = [n for n, m in out.named_modules() if is_batchnorm(m)]
    # Branchy's bn_twice follows an activation, not a conv: it stays.
    assert left == (["bn_twice"] if name == "branchy" else [])
    for k, v in reference.state_dict().items():  # the model passed in is not changed
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert_close(out(x), want, **F32, name=name)


def test_our_fused_residual_and_activation_become_add_then_module():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = batchnorm.BatchNorm2d(3, activation="relu")
            self.conv2 = nn.Conv2d(3, 3, 1)
            self.bn2 = batchnorm.FrozenBatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x), x) + self.bn2(self.conv2(x), residual=x)

    model = randomize(Residual()).eval()
    with torch.no_grad():
        model.bn2.running_mean.fill_(0.3)
    x = example()
    with torch.no_grad():
        want = model(x)
    out = fold_batchnorm(model, strict=True)
    assert type(out.bn) is nn.ReLU and not hasattr(out, "bn2")
    assert sum(n.target is torch.add for n in out.graph.nodes) == 2
    with torch.no_grad():
        assert_close(out(x), want, **F32, name="residual")


def test_frozen_layers_fold_in_any_mode_of_theirs():
    class FrozenBatchNorm2d(nn.Module):  # torchvision's layout
        def __init__(self, c):
            super().__init__()
            for k, v in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)),
                         ("running_mean", torch.randn(c)), ("running_var", torch.rand(c) + 0.5)):
                self.register_buffer(k, v)
            self.eps = 1e-5

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return (x - self.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) \
                + self.bias.view(1, -1, 1, 1)

    ours = randomize(batchnorm.FrozenBatchNorm2d(4))
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ours, nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4))
    model.eval()
    ours.train()  # a frozen layer's flag changes nothing
    x = example()
    with torch.no_grad():
        want = model(x)
    fold_batchnorm(model, strict=True)
    assert [type(m).__name__ for m in model] == ["Conv2d", "Identity", "Conv2d", "Identity"]
    with torch.no_grad():
        assert_close(model(x), want, **F32, name="frozen")


def test_refusals_change_nothing():
    model = make("sequential")  # training mode
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="training mode; call model.eval"):
        fold_batchnorm(model)
    model.eval()
    model[4].train()
    with pytest.raises(ValueError, match="4 is in training mode"):
        fold_batchnorm(model)
    model[4].eval()
    model[7] = nn.BatchNorm2d(6, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="7 has no running statistics"):
        fold_batchnorm(model)
    assert [type(m) for m in model].count(nn.BatchNorm2d) == 3
    model[7] = nn.Sequential(nn.MaxPool2d(1), nn.BatchNorm2d(6).eval())  # nothing to fold into
    with pytest.raises(ValueError, match=r"7\.1 follows a MaxPool2d, not a conv"):
        fold_batchnorm(model, strict=True)
    with pytest.raises(ValueError, match=r"7\.1 does not follow a foldable layer"):
        fold_batchnorm(model, trace=False, strict=True)
    for k, v in before.items():
        if k in model.state_dict() and not k.startswith("7"):
            assert torch.equal(model.state_dict()[k], v), k
    assert sum(isinstance(m, _BatchNorm) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="has no batch-norm layer"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(1, 1, 1)).eval())
    with pytest.raises(ValueError, match="trace must be"):
        fold_batchnorm(model, trace="yes")


def test_auto_keeps_sequential_models_and_falls_back_when_untraceable():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else self.bn(self.conv(x))

    model = randomize(DataDependent()).eval()
    x = example()
    with torch.no_grad():
        want = model(x)
    with pytest.raises(TypeError, match="cannot be traced"):
        fold_batchnorm(model, trace=True)
    out = fold_batchnorm(model)  # auto: the Sequential pair, in place; the rest stays
    assert out is model and type(model.body[1]) is nn.Identity and type(model.bn) is nn.BatchNorm2d
    with torch.no_grad():
        assert_close(model(x), want, **F32, name="fallback")


def test_conv_output_used_elsewhere_is_not_folded():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize(Tap()).eval()
    x = example()
    with torch.no_grad():
        want = model(x)
    out = fold_batchnorm(model)
    assert isinstance(out.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert_close(out(x), want, **F32, name="tap")
    with pytest.raises(ValueError, match="whose output is used elsewhere"):
        fold_batchnorm(model, strict=True)


def test_small_resnet_sequential_only_folds_the_stem_and_shortcuts():
    model = randomize(SmallResNet()).eval()
    fold_batchnorm(model, trace=False)
    left = sorted(n for n, m in model.named_modules() if is_batchnorm(m))
    assert left == ["blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2"]


def test_timm_style_bn_act_keeps_its_activation_and_unknown_subclasses_stay():
    class BatchNormAct2d(nn.BatchNorm2d):  # timm's layout: BN state, then drop and act
        def __init__(self, c):
            super().__init__(c)
            self.drop, self.act = nn.Identity(), nn.SiLU()

        def forward(self, x):
            return self.act(self.drop(super().forward(x)))

    class Doubled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4),
                                    nn.Conv2d(4, 4, 1), Doubled(4))).eval()
    x = example()
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ValueError, match=r"3 is a .*Doubled, a subclass whose inference"):
        fold_batchnorm(model, strict=True)
    out = fold_batchnorm(model)  # the Doubled layer is left: auto tries the traced graph
    assert type(out.get_submodule("1")) is nn.SiLU and type(out.get_submodule("3")) is Doubled
    with torch.no_grad():
        assert_close(out(x), want, **F32, name="timm-style")
