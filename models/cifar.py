"""The CIFAR networks used by the EigenDamage / OBA pruning papers.

- ``cifar_vgg19``: VGG-19 with BatchNorm, bias-free 3x3 convs, max pools, a final
  ``AvgPool2d(2)`` and a single ``Linear(512, num_classes)``: 20.04M parameters at
  10 classes. Needs 32x32 inputs (the last pool maps 2x2 -> 1x1).
- ``cifar_resnet32_w4``: ResNet-32 (3 stages x 5 basic blocks) at 4x width
  (64/128/256): 7.43M parameters at 10 classes.
- ``cifar_resnet20`` / ``cifar_resnet32``: standard widths 16/32/64.

All ResNets use option-B shortcuts (1x1 conv + BN projection when the shape changes;
the 4x-wide net's published 7.43M count requires them) and a global average pool, so
they accept any input size, e.g. 1x28x28 Fashion-MNIST with ``in_chans=1``.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn as nn

from .fixtures import BasicBlock
from .registry import register_model

VGG19_CFG: List[Union[int, str]] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                    512, 512, 512, 512, "M", 512, 512, 512, 512]


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


class CifarVGG(nn.Module):
    """``cfg`` of 3x3 conv(bias=False)-BN-ReLU layers and 'M' max pools, AvgPool2d(2), Linear."""

    def __init__(self, cfg: Sequence[Union[int, str]] = VGG19_CFG, num_classes: int = 10,
                 in_chans: int = 3, width_mult: float = 1.0):
        super().__init__()
        self.input_size = (in_chans, 32, 32)
        layers: List[nn.Module] = []
        c = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = _scaled(int(v), width_mult)
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU()]
            c = out
        layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: 3x3 stem, 3 stages of n basic blocks, global pool, Linear."""

    def __init__(self, depth: int = 20, widen: int = 1, num_classes: int = 10,
                 in_chans: int = 3, width_mult: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [_scaled(16 * widen * m, width_mult) for m in (1, 2, 4)]
        self.input_size = (in_chans, 32, 32)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, w, stride=2 if i > 0 and j == 0 else 1))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("cifar_vgg19", "VGG-19-BN for CIFAR (EigenDamage/OBA), AvgPool2d(2) + "
                "Linear(512): 20.04M params", input_size=(3, 32, 32))
def cifar_vgg19(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> nn.Module:
    """:class:`CifarVGG` with the VGG-19 config; input ``[B, in_chans, 32, 32]``."""
    return CifarVGG(VGG19_CFG, num_classes, in_chans, width_mult)


@register_model("cifar_resnet20", "ResNet-20 for CIFAR (16/32/64), option-B shortcuts: 0.27M params",
                input_size=(3, 32, 32))
def cifar_resnet20(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> nn.Module:
    """:class:`CifarResNet` depth 20; input ``[B, in_chans, H, W]`` (32x32 default)."""
    return CifarResNet(20, 1, num_classes, in_chans, width_mult)


@register_model("cifar_resnet32", "ResNet-32 for CIFAR (16/32/64), option-B shortcuts: 0.46M params",
                input_size=(3, 32, 32))
def cifar_resnet32(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> nn.Module:
    """:class:`CifarResNet` depth 32; input ``[B, in_chans, H, W]`` (32x32 default)."""
    return CifarResNet(32, 1, num_classes, in_chans, width_mult)


@register_model("cifar_resnet32_w4", "4x-wide ResNet-32 for CIFAR (64/128/256, EigenDamage/OBA), "
                "option-B shortcuts: 7.43M params", input_size=(3, 32, 32))
def cifar_resnet32_w4(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> nn.Module:
    """:class:`CifarResNet` depth 32, widen 4; input ``[B, in_chans, H, W]`` (32x32 default)."""
    return CifarResNet(32, 4, num_classes, in_chans, width_mult)
