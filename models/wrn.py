"""Wide ResNets WRN-d-k of the original: wrn_16_2, wrn_40_2, wrn_28_4.

Layout: 3x3 conv 3->16 without BN, three stages of (d-4)/6 pre-activation blocks of
width 16k/32k/64k with strides 1/2/2, final BN + ReLU, global average pool (8x8 at
32x32 input), Linear. Dropout is 0 in the original, so there is none here.

Split: stem = conv1, block1; branch = block2, block3, bn, avgpool, fc.
Init, as the original: convs N(0, sqrt(2 / (k*k*out))) (this is Kaiming normal with
fan_out and relu, which the branched model names explicitly), BN weight 1 / bias 0;
the independent networks also zero the Linear bias, the branched model leaves it at
PyTorch's default.
"""
from typing import Tuple

import torch
import torch.nn as nn

from .fused import bn_relu
from .registry import ArchSpec, register_arch


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

    When the width changes, the BN-ReLU'd input feeds both the conv path and a 1x1
    strided shortcut conv; otherwise the raw input is added back.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = bn_relu(self.bn1, x)
        out = self.conv2(bn_relu(self.bn2, self.conv1(pre)))
        identity = x if self.shortcut is None else self.shortcut(pre)
        return out + identity


def make_stage(in_planes: int, out_planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """``num_blocks`` blocks; only the first changes width and stride."""
    blocks = [PreActBlock(in_planes, out_planes, stride)]
    blocks += [PreActBlock(out_planes, out_planes, 1) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def init_wrn_weights(module: nn.Module, zero_linear_bias: bool) -> None:
    """Kaiming normal (fan_out, relu) convs, BN 1/0, optionally zero Linear biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)


def blocks_per_stage(depth: int) -> int:
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    return (depth - 4) // 6


class WRNStem(nn.Module):
    """(B, 3, H, W) -> (B, 16k, H, W)."""

    def __init__(self, depth: int, widen_factor: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = make_stage(16, 16 * widen_factor, blocks_per_stage(depth), stride=1)
        init_wrn_weights(self, zero_linear_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block1(self.conv1(x))


class WRNBranch(nn.Module):
    """(B, 16k, H, W) -> (logits (B, C), feature (B, 64k))."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, zero_linear_bias: bool):
        super().__init__()
        n = blocks_per_stage(depth)
        self.block2 = make_stage(16 * widen_factor, 32 * widen_factor, n, stride=2)
        self.block3 = make_stage(32 * widen_factor, 64 * widen_factor, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * widen_factor)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 64 * widen_factor
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_wrn_weights(self, zero_linear_bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = bn_relu(self.bn, self.block3(self.block2(x)))
        feature = torch.flatten(self.avgpool(out), 1)
        return self.fc(feature), feature


def register_wrn(name: str, depth: int, widen_factor: int) -> None:
    register_arch(ArchSpec(
        name=name,
        make_stem=lambda topology: WRNStem(depth, widen_factor),
        make_branch=lambda num_classes, topology: WRNBranch(
            depth, widen_factor, num_classes, zero_linear_bias=(topology == "independent")),
        feature_dim=64 * widen_factor,
        input_size=32,
        family="cifar",
    ))


register_wrn("wrn_16_2", 16, 2)
register_wrn("wrn_40_2", 40, 2)
register_wrn("wrn_28_4", 28, 4)
