"""Hand-made models for the tool tests: an ``nn.Sequential``, an FX-traceable module, a ResNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.tools._common import is_batchnorm


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN state (running statistics, weight, bias), so eval outputs mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                C = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(C, generator=g) * 1.5 + 0.25)
            if isinstance(m, (_BatchNorm, batchnorm.FrozenBatchNorm)):
                C = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(C, generator=g) * 0.3)
    return model


def seq_net(bn=nn.BatchNorm2d, bn1d=nn.BatchNorm1d) -> nn.Sequential:
    """Conv (no bias), grouped conv, grouped transposed conv, linear; each then BN, activation."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, groups=2), bn(8), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2), bn(6), nn.SiLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5), bn1d(5), nn.Tanh(),
    )


class Branchy(nn.Module):
    """FX-traceable, not a Sequential: functional activations, a 1d and a 3d path, a BN whose
    output feeds two consumers, a BN with ``affine=False``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv_t = nn.ConvTranspose1d(6, 4, 3)
        self.bn1 = nn.BatchNorm1d(4, affine=False)
        self.conv3 = nn.Conv3d(1, 2, 2, bias=False)
        self.bn3 = nn.BatchNorm3d(2)
        self.bn_twice = nn.BatchNorm2d(6)
        self.head = nn.Linear(4 + 2 + 6, 3)

    def forward(self, x):
        h = F.leaky_relu(self.bn(self.conv(x)), negative_slope=0.1)
        t = self.bn1(self.conv_t(h.mean(dim=3)))
        t = torch.sigmoid(t).mean(dim=2)
        v = self.bn3(self.conv3(h[:, :2].unsqueeze(1))).relu()
        v = v.flatten(2).mean(dim=2)
        b = self.bn_twice(h)  # used twice: cannot take an activation
        u = torch.tanh(b).mean(dim=(2, 3)) + b.mean(dim=(2, 3))
        return self.head(torch.cat([t, v, u], dim=1))


class Block(nn.Module):
    """ResNet basic block: conv-BN-ReLU, conv-BN, shortcut (1x1 conv-BN when it strides), add,
    ReLU (one ReLU module used twice, as torchvision's)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, widths=(8, 16), classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


MODELS = {"sequential": seq_net, "branchy": Branchy, "resnet": SmallResNet}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(MODELS[name](), seed)


def example(seed: int = 1, n: int = 4, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 1.5 + 0.5


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every BN buffer and parameter, cloned."""
    return {f"{n}.{k}": v.detach().clone() for n, m in model.named_modules() if is_batchnorm(m)
            for k, v in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
