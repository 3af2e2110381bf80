"""Tiny convolutional topology fixtures.

Each net exercises one channel-coupling pattern that the analysis and rewrite passes
must handle (residual add, projection shortcut, concat, depthwise / grouped conv,
gating multiply, split, flatten into a Linear). Widths are 8-32 channels and images
are 3x16x16, so every forward runs in well under a millisecond-scale budget on CPU.
The attention / ViT / ConvNeXt fixtures live in :mod:`.fixtures_transformer`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model

IMAGE = (3, 16, 16)


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d [-> ReLU]`` with 'same' padding."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PoolHead(nn.Module):
    """Global average pool -> flatten -> Linear classifier."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyMLP(nn.Module):
    """Linear(+bias) -> ReLU -> Linear -> ReLU -> Linear over a flat ``[B, in_features]`` input."""

    def __init__(self, in_features: int = 16, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.input_size = (in_features,)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyVGG(nn.Module):
    """conv-BN-ReLU chain with max pooling and a pooled Linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8), conv_bn(8, 8), nn.MaxPool2d(2),
            conv_bn(8, 16), nn.MaxPool2d(2), conv_bn(16, 16))
        self.head = PoolHead(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; 1x1 conv+BN projection shortcut when stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, an identity basic block, then a strided block with a projection shortcut."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.head = PoolHead(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x``expansion``) with a residual add."""

    def __init__(self, cin: int, mid: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        cout = mid * expansion
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride)
        self.conv3 = conv_bn(mid, cout, 1, relu=False)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class TinyBottleneck(nn.Module):
    """Two bottleneck blocks: the first projects 8 -> 16 channels, the second is identity."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layer1 = nn.Sequential(Bottleneck(8, 4, stride=2), Bottleneck(16, 4))
        self.head = PoolHead(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(self.stem(x)))


class DenseLayer(nn.Module):
    """BN -> ReLU -> 3x3 conv producing ``growth`` channels, concatenated onto the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class TinyDenseNet(nn.Module):
    """DenseNet: 8-channel stem, 3 dense layers (growth 4), transition, 2 dense layers."""

    def __init__(self, num_classes: int = 10, growth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        c = 8
        block1 = []
        for _ in range(3):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(),
                                        nn.Conv2d(c, 12, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(12, growth), DenseLayer(12 + growth, growth))
        c = 12 + 2 * growth
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.head = PoolHead(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.head(self.relu(self.norm(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> depthwise 3x3 (groups=C) -> 1x1 project [+ input]."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False),
                                    nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = conv_bn(hidden, cout, 1, relu=False)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        if self.use_residual:
            out = out + x
        return out


class TinyMobileNet(nn.Module):
    """Stem, three inverted residual blocks (two with residual adds), 1x1 head conv."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8), InvertedResidual(8, 16, stride=2),
                                    InvertedResidual(16, 16))
        self.head_conv = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.head = PoolHead(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_conv(self.blocks(self.stem(x))))


class SqueezeExcite(nn.Module):
    """global mean -> Linear -> ReLU -> Linear -> sigmoid -> per-channel multiply."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, reduced)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(reduced, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean((2, 3))))))
        return x * s.unsqueeze(-1).unsqueeze(-1)


class TinySE(nn.Module):
    """conv-BN-ReLU, a squeeze-excite gate, a residual add and a pooled head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.conv = conv_bn(16, 16)
        self.se = SqueezeExcite(16, 4)
        self.head = PoolHead(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.se(self.conv(x)))


class TinySplit(nn.Module):
    """torch.split into uneven parts, chunk one of them, different ops per branch, cat back."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.branch_a = conv_bn(6, 6)
        self.branch_c = conv_bn(5, 8, 1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.fuse = conv_bn(6 + 5 + 8, 16, 1)
        self.head = PoolHead(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, bc = torch.split(x, [6, 10], dim=1)
        b, c = bc.chunk(2, dim=1)
        y = torch.cat([self.branch_a(a), self.pool(b), self.branch_c(c)], dim=1)
        return self.head(self.fuse(y))


class TinyFlatten(nn.Module):
    """Two strided convs, then flatten ``[B, 8, 4, 4]`` into a Linear over C*H*W features."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv_bn(3, 8, stride=2)
        self.conv2 = conv_bn(8, 8, stride=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv2(self.conv1(x)), 1)
        return self.fc2(self.relu(self.fc1(x)))


class GroupedBlock(nn.Module):
    """ResNeXt block: 1x1 -> 3x3 grouped conv (``groups`` x 4 channels) -> 1x1, residual add."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels, 1)
        self.conv2 = conv_bn(channels, channels, 3, groups=groups)
        self.conv3 = conv_bn(channels, channels, 1, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv3(self.conv2(self.conv1(x))))


class TinyGrouped(nn.Module):
    """A ResNeXt-style grouped block (groups=4, 4 ch/group) and a widening grouped conv 16->32."""

    def __init__(self, num_classes: int = 10, groups: int = 4):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block = GroupedBlock(16, groups)
        self.widen = conv_bn(16, 32, 3, stride=2, groups=groups)
        self.head = PoolHead(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.widen(self.block(self.stem(x))))


@register_model("tiny_vgg", "conv-BN-ReLU chain with max pooling and a Linear head",
                input_size=IMAGE)
def tiny_vgg(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyVGG`; input ``[B, 3, 16, 16]``."""
    return TinyVGG(num_classes=num_classes, **kwargs)


@register_model("tiny_resnet", "residual basic blocks with a 1x1 conv+BN projection shortcut",
                input_size=IMAGE)
def tiny_resnet(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyResNet`; input ``[B, 3, 16, 16]``."""
    return TinyResNet(num_classes=num_classes, **kwargs)


@register_model("tiny_bottleneck", "ResNet bottleneck 1x1-3x3-1x1 blocks with expansion 4",
                input_size=IMAGE)
def tiny_bottleneck(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyBottleneck`; input ``[B, 3, 16, 16]``."""
    return TinyBottleneck(num_classes=num_classes, **kwargs)


@register_model("tiny_densenet", "DenseNet-style torch.cat of growing feature maps",
                input_size=IMAGE)
def tiny_densenet(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyDenseNet`; input ``[B, 3, 16, 16]``."""
    return TinyDenseNet(num_classes=num_classes, **kwargs)


@register_model("tiny_mobilenet", "inverted residuals: 1x1 expand, depthwise 3x3, 1x1 project, add",
                input_size=IMAGE)
def tiny_mobilenet(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyMobileNet`; input ``[B, 3, 16, 16]``."""
    return TinyMobileNet(num_classes=num_classes, **kwargs)


@register_model("tiny_se", "squeeze-excite gate: pool, FC, ReLU, FC, sigmoid, multiply",
                input_size=IMAGE)
def tiny_se(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinySE`; input ``[B, 3, 16, 16]``."""
    return TinySE(num_classes=num_classes, **kwargs)


@register_model("tiny_split", "torch.split + chunk into branches with different ops, cat back",
                input_size=IMAGE)
def tiny_split(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinySplit`; input ``[B, 3, 16, 16]``."""
    return TinySplit(num_classes=num_classes, **kwargs)


@register_model("tiny_flatten", "conv -> flatten -> Linear over C*H*W features", input_size=IMAGE)
def tiny_flatten(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyFlatten`; input ``[B, 3, 16, 16]``."""
    return TinyFlatten(num_classes=num_classes, **kwargs)


@register_model("tiny_grouped", "ResNeXt-style grouped convs, groups=4 with 4 channels per group",
                input_size=IMAGE)
def tiny_grouped(num_classes: int = 10, **kwargs) -> nn.Module:
    """:class:`TinyGrouped`; input ``[B, 3, 16, 16]``."""
    return TinyGrouped(num_classes=num_classes, **kwargs)


@register_model("tiny_mlp", "Linear+bias, ReLU, 2 hidden layers over a flat vector", input_size=(16,))
def tiny_mlp(num_classes: int = 10, in_features: int = 16, hidden: int = 32) -> nn.Module:
    """Two hidden layers of ``hidden`` units; input ``[B, in_features]``."""
    return TinyMLP(in_features, hidden, num_classes)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 eval mode with non-trivial norm layers, for oracle tests.

    Fresh BatchNorm statistics (mean 0, var 1) and affine parameters (1, 0) hide
    mistakes in how a criterion differentiates through a norm; this draws running
    statistics and affine parameters from fixed ranges instead (seeded; in place)."""
    torch.manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model
