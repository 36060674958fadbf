"""The model tools on real architectures: torchvision's and timm's, random weights, no downloads.

Run with ``make test-zoo`` (a separate virtual environment with torchvision and
timm; CI does not run it). Each model gets realistic running statistics from
two training batches first, so eval outputs are not trivially the input.
"""

import copy
import functools

import pytest
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

try:
    import timm
    import torchvision
except Exception:  # torchvision raises more than ImportError beside a foreign torch build
    pytest.skip("needs torchvision and timm (make test-zoo)", allow_module_level=True)

import batchnorm
from batchnorm.nn.batchnorm import _OursMixin
from batchnorm.tools import (
    convert_batchnorm,
    fold_batchnorm,
    freeze_batchnorm,
    frozen_batchnorm,
    recalibrate_batchnorm,
    unfreeze_batchnorm,
)
from batchnorm.tools._common import is_batchnorm, is_timm_bn_act

FACTORIES = {
    "torchvision-resnet18": lambda: torchvision.models.resnet18(weights=None),
    "torchvision-mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "torchvision-efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "timm-resnet18": lambda: timm.create_model("resnet18", pretrained=False),
    "timm-efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
}
NAMES = list(FACTORIES)
SIZE = 64  # small inputs: the deepest feature maps are 2x2


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g)


@functools.cache
def _warmed_up(name):
    torch.manual_seed(0)
    model = FACTORIES[name]()
    with torch.no_grad():
        for seed in (100, 101):
            model(data(8, seed))
    return model.eval()


def model_for(name):
    return copy.deepcopy(_warmed_up(name))


def close(got, want, what, rel=1e-4):
    """Max error within ``rel`` of the output's largest magnitude (these outputs are as
    small as 1e-4 for a randomly initialised MobileNet)."""
    err = (got.detach() - want.detach()).abs().max().item()
    scale = want.detach().abs().max().item()
    assert err <= rel * scale + 1e-7, f"{what}: max error {err:.3g} for outputs up to {scale:.3g}"


def bn_buffers(model):
    return {f"{n}.{k}": v.clone() for n, m in model.named_modules() if is_batchnorm(m)
            for k, v in m.named_buffers(recurse=False)}


def seeded(model, x, seed=0):
    """``model(x)`` with the random state reset first: dropout and stochastic depth draw the
    same masks in two models that run the same random ops."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


def bn_eval_rest_train(model):
    model.train()
    for m in model.modules():
        if is_batchnorm(m):
            m.eval()
    return model


def same_computation(reference, converted, what):
    a, b = copy.deepcopy(reference), copy.deepcopy(converted)
    x = data(4, 1)
    close(seeded(b.eval(), x), seeded(a.eval(), x), f"{what}, eval")
    close(seeded(b.train(), x), seeded(a.train(), x), f"{what}, train")
    sa, sb = bn_buffers(a), bn_buffers(b)
    for k, v in sa.items():
        close(sb[k].double(), v.double(), f"{what}, {k}")


@pytest.mark.parametrize("name", NAMES)
def test_convert_to_ours_and_back(name):
    model = model_for(name)
    reference = copy.deepcopy(model)
    has_bn_act = any(is_timm_bn_act(m) for m in model.modules())
    ours = convert_batchnorm(model, fuse_activation=True)
    layers = [m for m in ours.modules() if is_batchnorm(m)]
    assert layers and all(isinstance(m, _OursMixin) for m in layers)
    assert sum(m.activation is not None for m in layers) > 0 or "resnet" in name
    same_computation(reference, ours, "ours")
    if has_bn_act:  # timm's BatchNormAct2d became ours with its activation: torch has no place
        with pytest.raises(TypeError, match="fused activation"):
            convert_batchnorm(ours, to="torch")
        return
    back = convert_batchnorm(ours, to="torch")
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in back.modules()
               if is_batchnorm(m))
    assert list(back.state_dict()) == list(reference.state_dict())
    same_computation(reference, back, "back to torch")


@pytest.mark.parametrize("name", NAMES)
def test_fuse_activation_fx(name):
    model = model_for(name)
    classes = [type(m) for m in model.modules()]
    gm = convert_batchnorm(model, fuse_activation="fx")
    assert isinstance(gm, fx.GraphModule)
    assert [type(m) for m in model.modules()] == classes  # the model passed in is unchanged
    assert sum(getattr(m, "activation", None) is not None for m in gm.modules()) > 0
    same_computation(model, gm, "fx-fused")


@pytest.mark.parametrize("name", NAMES)
def test_to_frozen_and_to_sync(name):
    model = model_for(name)
    x = data(4, 2)
    want = seeded(bn_eval_rest_train(copy.deepcopy(model)), x)
    frozen = convert_batchnorm(copy.deepcopy(model), to="frozen").train()
    assert all(isinstance(m, batchnorm.FrozenBatchNorm) for m in frozen.modules()
               if is_batchnorm(m))
    close(seeded(frozen, x), want, "frozen, train mode")
    sync = convert_batchnorm(copy.deepcopy(model), to="sync")
    assert all(type(m) is batchnorm.SyncBatchNorm for m in sync.modules() if is_batchnorm(m))
    same_computation(model, sync, "sync without a process group")


@pytest.mark.parametrize("name", NAMES)
def test_fold_for_inference(name):
    model = model_for(name)
    x = data(4, 3)
    with torch.no_grad():
        want = model(x)
    for start in (model, convert_batchnorm(copy.deepcopy(model), fuse_activation=True)):
        folded = fold_batchnorm(copy.deepcopy(start), strict=True)
        assert not any(is_batchnorm(m) for m in folded.modules())
        with torch.no_grad():
            close(folded(x), want, "folded", rel=1e-4)


def population(model, batches):
    """Every BN layer's input, gathered over all batches (the same float32 forward the tool
    runs), and its mean and unbiased variance in float64."""
    net = copy.deepcopy(model)
    seen = {}
    for name, m in net.named_modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(
                lambda _, args, name=name: seen.setdefault(name, []).append(
                    args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)))
            m.train()
        else:
            m.training = False
    with torch.no_grad():
        for x in batches:
            net(x)
    return {n: (torch.cat(p, 1).mean(1), torch.cat(p, 1).var(1)) for n, p in seen.items()}


@pytest.mark.parametrize("name", NAMES)
def test_recalibrate_exact_population_statistics(name):
    model = model_for(name)
    batches = [data(6, 10), data(6, 11), data(3, 12)]  # a short last batch
    want = population(model, batches)
    counters = {n: m.num_batches_tracked.clone() for n, m in model.named_modules()
                if isinstance(m, _BatchNorm)}
    recalibrate_batchnorm(model, [(x, torch.zeros(len(x))) for x in batches])
    assert not model.training
    layers = dict(model.named_modules())
    for n, (mean, var) in want.items():
        m = layers[n]
        close(m.running_mean.double(), mean, f"{n} mean", rel=1e-5)
        close(m.running_var.double(), var, f"{n} var", rel=1e-5)
        assert torch.equal(m.num_batches_tracked, counters[n])


@pytest.mark.parametrize("name", NAMES)
def test_freeze_survives_train(name):
    model = model_for(name)
    x = data(4, 4)
    want = seeded(bn_eval_rest_train(copy.deepcopy(model)), x)
    before = bn_buffers(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    freeze_batchnorm(model)
    model.train()
    # Dropout and stochastic depth run in train mode; the BN layers do not.
    close(seeded(model, x), want, "frozen in train mode", rel=1e-6)
    assert all(torch.equal(bn_buffers(model)[k], v) for k, v in before.items())
    assert len(frozen_batchnorm(model)) == sum(isinstance(m, _BatchNorm)
                                               for m in model.modules())
    unfreeze_batchnorm(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_timm_frozen_and_sync_norm_act_layers_keep_their_activation():
    from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d

    model = model_for("timm-efficientnet_b0")
    x = data(2, 5)
    with torch.no_grad():
        want = model(x)
    variants = {"FrozenBatchNormAct2d": freeze_batch_norm_2d(copy.deepcopy(model)),
                "SyncBatchNormAct": convert_sync_batchnorm(copy.deepcopy(model))}
    for name, variant in variants.items():
        assert any(type(m).__name__ == name for m in variant.modules())
        ours = convert_batchnorm(copy.deepcopy(variant))
        assert sum(getattr(m, "activation", None) == "silu" for m in ours.modules()) > 0
        folded = fold_batchnorm(copy.deepcopy(variant), strict=True)
        with torch.no_grad():
            close(ours(x), want, f"{name} as ours")
            close(folded(x), want, f"{name} folded")
