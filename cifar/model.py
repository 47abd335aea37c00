"""The CIFAR ResNet-18 (He et al. 2016, in the form of kuangliu/pytorch-cifar).

Unlike torchvision's ImageNet ResNet-18 the stem is a single 3x3 convolution with
stride 1 and there is no max-pool, so 32x32 images keep their resolution into the
first stage. Four stages of two BasicBlocks each, widths 64-128-256-512, the last
three halving the resolution (32 -> 16 -> 8 -> 4), then global average pooling and
a linear classifier: 11,173,962 parameters for 10 classes. ``width`` scales the
stage widths (``width`` x 1-2-4-8); 64 is ResNet-18, smaller values exist only for
fast smoke tests. Convolutions have no bias
(each is followed by BatchNorm); the PyTorch default initialisation is kept.
"""
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F

from harness.config import check_count


@dataclass(frozen=True)
class ResNetConfig:
    """The ``model`` section of cifar's configs; a width below 1 is a one-line UsageError."""

    width: int = 64  # the first stage's channels (ResNet-18's 64; smaller only for smoke tests)

    def __post_init__(self):
        check_count("model.width", self.width)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 strided conv + BN when the block changes
    the resolution or the width.
    """

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stem, four stages of ``block``s, global average pool, linear head."""

    def __init__(self, block, num_blocks, num_classes=10, width=64):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], stride=2)
        self.linear = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        # Only the first block of a stage downsamples.
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        """(B, 3, H, W) images -> (B, num_classes) logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pool (kuangliu's avg_pool2d(out, 4) on 32x32 inputs).
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes=10, **model):
    """CIFAR ResNet-18: BasicBlock x [2, 2, 2, 2], stage widths ``width`` x (1, 2, 4, 8)
    (``model``: ``ResNetConfig``'s fields)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=ResNetConfig(**model).width)
