"""CIFAR ShuffleNetV2 of the original: ShuffleNetV2_05x and ShuffleNetV2_1x.

Layout: 3x3 conv 3->24 + BN + ReLU (no max-pool), three stages each made of a
stride-2 down block then [3, 7, 3] split/shuffle blocks (split ratio 0.5, 2-group
channel shuffle), 1x1 conv to 1024 + BN + ReLU, global average pool (4x4 at 32x32
input), Linear. PyTorch default init.

Split: stem = conv1, bn1, layer1; branch = layer2, layer3, conv2, bn2, avgpool, linear.
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import ArchSpec, register_arch

STEM_WIDTH = 24
NUM_BLOCKS = (3, 7, 3)
STAGE_WIDTHS: Dict[str, Tuple[int, int, int, int]] = {
    "0.5x": (48, 96, 192, 1024),
    "1x": (116, 232, 464, 1024),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W) with channels interleaved across ``groups``."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, depthwise: bool = False) -> nn.Sequential:
    """Conv (no bias, 'same' padding, optionally depthwise) followed by BN; no activation."""
    groups = in_ch if depthwise else 1
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class ShuffleBlock(nn.Module):
    """Keep half of the channels, transform the other half, concatenate, shuffle."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        ch = int(channels * split_ratio)
        self.pw1 = conv_bn(ch, ch, 1)
        self.dw = conv_bn(ch, ch, 3, depthwise=True)
        self.pw2 = conv_bn(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :keep], x[:, keep:]
        out = F.relu(self.pw2(self.dw(F.relu(self.pw1(x2)))))
        return channel_shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Stride-2 block: two paths of out/2 channels each, concatenated and shuffled."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 2
        self.left_dw = conv_bn(in_ch, in_ch, 3, stride=2, depthwise=True)
        self.left_pw = conv_bn(in_ch, mid, 1)
        self.right_pw1 = conv_bn(in_ch, mid, 1)
        self.right_dw = conv_bn(mid, mid, 3, stride=2, depthwise=True)
        self.right_pw2 = conv_bn(mid, mid, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.left_pw(self.left_dw(x)))
        right = F.relu(self.right_pw2(self.right_dw(F.relu(self.right_pw1(x)))))
        return channel_shuffle(torch.cat([left, right], 1))


def make_stage(in_ch: int, out_ch: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(DownBlock(in_ch, out_ch), *[ShuffleBlock(out_ch) for _ in range(num_blocks)])


class ShuffleNetV2Stem(nn.Module):
    """(B, 3, 32, 32) -> (B, widths[0], 16, 16)."""

    def __init__(self, widths: Tuple[int, int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.layer1 = make_stage(STEM_WIDTH, widths[0], NUM_BLOCKS[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(F.relu(self.bn1(self.conv1(x))))


class ShuffleNetV2Branch(nn.Module):
    """(B, widths[0], 16, 16) -> (logits (B, C), feature (B, 1024))."""

    def __init__(self, widths: Tuple[int, int, int, int], num_classes: int):
        super().__init__()
        self.layer2 = make_stage(widths[0], widths[1], NUM_BLOCKS[1])
        self.layer3 = make_stage(widths[1], widths[2], NUM_BLOCKS[2])
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = widths[3]
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn2(self.conv2(self.layer3(self.layer2(x)))))
        feature = torch.flatten(self.avgpool(out), 1)
        return self.linear(feature), feature


def register_shufflenet(name: str, size: str) -> None:
    widths = STAGE_WIDTHS[size]
    register_arch(ArchSpec(
        name=name,
        make_stem=lambda topology: ShuffleNetV2Stem(widths),
        make_branch=lambda num_classes, topology: ShuffleNetV2Branch(widths, num_classes),
        feature_dim=widths[3],
        input_size=32,
        family="cifar",
    ))


register_shufflenet("ShuffleNetV2_05x", "0.5x")
register_shufflenet("ShuffleNetV2_1x", "1x")
