"""The lab's networks, each with a choice of normalization.

* ``cnn``: the course's network, Conv2d+ReLU -> BN -> Flatten -> Linear+ReLU
  -> BN -> Linear (softmax in the loss), with BN after the ReLU (the course's
  code), before it (the "alternative" placement, our fused
  ``activation="relu"``), or absent;
* ``mlp``: the BN paper's MNIST network, 784-100-100-100-10 with sigmoids,
  BN (when on) on the input of each sigmoid;
* ``resnet``: a small ResNet (three stages of one basic block each), BN with
  the residual add and ReLU fused into the block's last norm.

``norm`` picks the normalization: ``"batch"`` (ours), ``"ghost"`` and
``"renorm"`` (our ghost-batch and Batch Renormalization layers), ``"none"``,
``"group"``, ``"layer"`` or ``"instance"`` (PyTorch's GroupNorm, LayerNorm and
InstanceNorm). Every model creates its weights in the same order whatever the
norm, and norm layers start at weight 1 and bias 0, so under one seed models
that differ only in normalization start from the same weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import batchnorm

NORMS = ("batch", "none", "group", "layer", "instance", "ghost", "renorm")
PLACEMENTS = ("after", "before")
ARCHS = ("cnn", "mlp", "resnet")

__all__ = ["ARCHS", "NORMS", "PLACEMENTS", "build_model", "norm_layer"]


def _group_count(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def norm_layer(norm: str, channels: int, *, spatial: bool, activation: str | None = None,
               momentum: float = 0.1) -> nn.Module:
    """A normalization layer (with the activation after it, fused for ours).

    Args:
        norm: one of :data:`NORMS`.
        channels: ``C``.
        spatial: ``True`` for ``(N, C, H, W)`` feature maps, ``False`` for
            ``(N, C)`` features.
        activation: ``None``, ``"relu"`` or ``"sigmoid"``, applied after the norm.
        momentum: BN's running-statistics momentum (PyTorch's convention).

    Instance normalization has nothing to normalize over for ``(N, C)``
    features (one value per sample and channel); there it is the identity,
    as in architectures that use it for conv layers only.

    ``"ghost"`` is our BN with ghost batches of 8 samples (a fixed size, so a
    sweep over batch sizes keeps the statistics' noise constant while the
    batch grows; training batches must hold at least 8 samples).
    ``"renorm"`` is Batch Renormalization with the paper's final limits
    ``rmax=3``, ``dmax=5`` and its warm-up schedule scaled down 50x for the
    lab's short runs: plain BN for 100 steps, then ``rmax`` relaxed over 700
    steps and ``dmax`` over 400.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    if norm in ("batch", "ghost"):
        cls = batchnorm.BatchNorm2d if spatial else batchnorm.BatchNorm1d
        ghost = dict(virtual_batch_size=8) if norm == "ghost" else {}
        return cls(channels, momentum=momentum, activation=activation, **ghost)
    if norm == "renorm":
        cls = batchnorm.BatchRenorm2d if spatial else batchnorm.BatchRenorm1d
        return cls(channels, momentum=momentum, activation=activation, rmax=3.0, dmax=5.0,
                   warmup_steps=100, relax_steps=(700, 400))
    if norm == "none" or (norm == "instance" and not spatial):
        layer = nn.Identity()
    elif norm == "group":
        layer = nn.GroupNorm(_group_count(channels), channels)
    elif norm == "layer":
        layer = nn.GroupNorm(1, channels) if spatial else nn.LayerNorm(channels)
    else:
        layer = nn.InstanceNorm2d(channels, affine=True)
    if activation is None:
        return layer
    return nn.Sequential(layer, _activation(activation))


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid()}[name]


def course_cnn(in_channels=1, image_size=28, num_classes=10, *, norm="batch", placement="after",
               conv_filters=32, dense_units=128, momentum=0.1) -> nn.Sequential:
    """The course's CNN; ``placement`` is ``"after"`` or ``"before"`` the ReLU."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    conv = nn.Conv2d(in_channels, conv_filters, 3)
    flat = conv_filters * (image_size - 2) ** 2
    dense = nn.Linear(flat, dense_units)
    head = nn.Linear(dense_units, num_classes)
    if norm == "none":
        block1, block2 = [nn.ReLU()], [nn.ReLU()]
    elif placement == "after":
        block1 = [nn.ReLU(), norm_layer(norm, conv_filters, spatial=True, momentum=momentum)]
        block2 = [nn.ReLU(), norm_layer(norm, dense_units, spatial=False, momentum=momentum)]
    else:
        block1 = [norm_layer(norm, conv_filters, spatial=True, activation="relu",
                             momentum=momentum)]
        block2 = [norm_layer(norm, dense_units, spatial=False, activation="relu",
                             momentum=momentum)]
    return nn.Sequential(conv, *block1, nn.Flatten(), dense, *block2, head)


def paper_mlp(in_features=784, num_classes=10, *, norm="batch", hidden=(100, 100, 100),
              momentum=0.1) -> nn.Sequential:
    """The BN paper's MNIST network: three sigmoid layers of 100 units.

    The modules named ``sigmoid{i}`` are the nonlinearities whose inputs the
    paper plots (Figure 1 b, c).
    """
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = in_features
    for i, units in enumerate(hidden):
        linear = nn.Linear(width, units)
        nn.init.normal_(linear.weight, std=1.0 / width ** 0.5)
        nn.init.zeros_(linear.bias)
        layers.append((f"linear{i}", linear))
        if norm != "none":
            layers.append((f"norm{i}", norm_layer(norm, units, spatial=False,
                                                  momentum=momentum)))
        layers.append((f"sigmoid{i}", nn.Sigmoid()))
        width = units
    layers.append(("head", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


class BasicBlock(nn.Module):
    """Two 3x3 convs; with our BN the add and ReLU run fused in the second norm."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm_layer(norm, cout, spatial=True, activation="relu", momentum=momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.fused = norm == "batch"
        self.norm2 = norm_layer(norm, cout, spatial=True, momentum=momentum,
                                activation="relu" if self.fused else None)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          norm_layer(norm, cout, spatial=True,
                                                     momentum=momentum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        y = self.conv2(self.norm1(self.conv1(x)))
        if self.fused:
            return self.norm2(y, residual=identity)  # relu(bn(y) + identity), one pass
        return torch.relu(self.norm2(y) + identity)


def small_resnet(in_channels=1, num_classes=10, *, norm="batch", widths=(16, 32, 64),
                 momentum=0.1) -> nn.Sequential:
    """A small ResNet for 28x28 or 32x32 images."""
    layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
              norm_layer(norm, widths[0], spatial=True, activation="relu", momentum=momentum)]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers.append(BasicBlock(cin, w, 1 if i == 0 else 2, norm, momentum))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build_model(arch: str, image_shape: tuple[int, int, int], num_classes: int, *,
                norm: str = "batch", placement: str = "after", momentum: float = 0.1,
                **kwargs) -> nn.Module:
    """One of :data:`ARCHS` for images of ``image_shape`` ``(C, H, W)``."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    c, h, w = image_shape
    if arch == "cnn":
        if h != w:
            raise ValueError(f"the course CNN expects square images, got {h}x{w}")
        return course_cnn(c, h, num_classes, norm=norm, placement=placement, momentum=momentum,
                          **kwargs)
    if arch == "mlp":
        return paper_mlp(c * h * w, num_classes, norm=norm, momentum=momentum, **kwargs)
    if arch == "resnet":
        return small_resnet(c, num_classes, norm=norm, momentum=momentum, **kwargs)
    raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
