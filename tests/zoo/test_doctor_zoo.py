"""doctor() on real architectures: silent on torchvision's and timm's models, random
weights, no downloads; the planted pitfalls still found in them.

Run with ``make test-zoo`` (a separate virtual environment with torchvision and
timm). timm's EfficientNet adds BN layers with children (``BatchNormAct2d``).
"""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

try:
    import timm
    import torchvision
except Exception:  # noqa: BLE001 - torchvision raises more than ImportError beside a foreign torch
    pytest.skip("needs torchvision and timm (make test-zoo)", allow_module_level=True)

from batchnorm.tools import doctor

FACTORIES = {
    "torchvision-resnet18": lambda: torchvision.models.resnet18(weights=None),
    "torchvision-resnet50": lambda: torchvision.models.resnet50(weights=None),
    "torchvision-mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "torchvision-efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "timm-resnet18": lambda: timm.create_model("resnet18", pretrained=False),
    "timm-efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
}
NAMES = list(FACTORIES)
SIZE = 64  # the deepest feature maps are 2x2


def images(n, seed=0, scale=1.0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * scale


def fresh(name):
    torch.manual_seed(0)
    return FACTORIES[name]()


def with_statistics(model):
    """Running statistics from three training batches (cumulative average), then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:
        m.momentum = None
    model.train()
    with torch.no_grad():
        for seed in (100, 101, 102):
            model(images(16, seed))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def bn_paths(model):
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def first(model, kind):
    return next(name for name, m in model.named_modules() if isinstance(m, kind))


def replace(model, path, new):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ------------------------------------------------------------ no false positives ---

@pytest.mark.parametrize("graph", ["fx", "runtime"])
@pytest.mark.parametrize("name", NAMES)
def test_silent_on_a_model_about_to_be_trained(name, graph):
    report = doctor(fresh(name), images(8), graph=graph)
    assert len(report) == 0, str(report)
    assert report.graph == graph and report.bn_layers > 0


@pytest.mark.parametrize("name", NAMES)
def test_silent_on_a_model_with_statistics_about_to_be_evaluated(name):
    model = with_statistics(fresh(name))
    for batch in (8, 1):
        report = doctor(model, images(batch, seed=7), mode="eval")
        assert len(report) == 0, str(report)


# ------------------------------------------------------------- planted pitfalls ---

@pytest.mark.parametrize("name", NAMES)
def test_planted_pitfalls_are_found(name):
    model = fresh(name)
    conv, bn = first(model, nn.Conv2d), first(model, _BatchNorm)
    model.get_submodule(conv).bias = nn.Parameter(torch.zeros(model.get_submodule(conv)
                                                              .out_channels))
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    linear = model.get_submodule(head)
    replace(model, head, nn.Sequential(nn.Linear(linear.in_features, linear.out_features,
                                                 bias=False),
                                       nn.BatchNorm1d(linear.out_features)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    pixels = torch.randint(0, 256, (8, 3, SIZE, SIZE)).float()
    # Left in training mode for an evaluation, on raw pixels, with decay on gamma/beta.
    report = doctor(model, pixels, mode="eval", optimizer=optimizer)
    found = {(f.code, f.path) for f in report}
    every_bn = bn_paths(model)
    expected = {("BN001", conv), ("BN003", f"{head}.1"), ("BN007", conv), ("BN011", ""),
                ("BN014", "")}
    # A fresh model's statistics were never updated: at evaluation that is an error for
    # every BN layer, a true finding on top of the planted ones.
    expected |= {("BN008", p) for p in every_bn}
    assert found == expected, str(report)
    assert report.by_code("BN011")[0].layers == tuple(every_bn)
    assert set(report.by_code("BN014")[0].layers) == set(every_bn)
    assert report.by_code("BN001")[0].layers == (conv, bn)


@pytest.mark.parametrize("name", NAMES)
def test_planted_dropout_small_batch_and_stale_statistics_are_found(name):
    model = fresh(name)
    bn = first(model, _BatchNorm)
    replace(model, bn, nn.Sequential(nn.Dropout(0.2), model.get_submodule(bn)))
    assert {(f.code, f.path) for f in doctor(model, images(8))} == {("BN004", f"{bn}.0")}

    model = fresh(name)
    report = doctor(model, images(2))
    assert [(f.code, f.path) for f in report] == [("BN006", "")]
    assert report.warnings[0].layers == tuple(bn_paths(model))

    model = with_statistics(model)
    report = doctor(model, images(8, scale=30.0), mode="eval", ignore=["BN007"])
    stale = report.by_code("BN010")
    assert stale and stale[0].path == bn and {f.code for f in report} == {"BN010"}


def test_the_model_is_unchanged():
    for model in (fresh(NAMES[0]), with_statistics(fresh(NAMES[0]))):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        modes = [m.training for m in model.modules()]
        doctor(model, images(8), mode="eval")
        doctor(model, images(1), mode="train", graph="runtime")
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert [m.training for m in model.modules()] == modes
