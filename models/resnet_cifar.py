"""CIFAR ResNets of the original: resnet32, resnet56 (basic blocks), resnet110 (bottlenecks).

Layout: 3x3 conv 3->16 + BN + ReLU, three stages of width 16/32/64 with strides
1/2/2, global average pool, Linear. The blocks are torchvision's (post-activation,
stride on the 3x3 conv, 1x1 conv + BN shortcut when the shape changes), which is
exactly what the original copied; their BN + ReLU pairs go through models.fused.bn_relu
(the same eager ops, fused only on the CPU bf16 fast path).

Split: stem = conv1, bn1, layer1; branch = layer2, layer3, avgpool, classifier.
Init (both topologies): convs Kaiming normal (fan_out, relu), BN weight 1 / bias 0,
Linear left at PyTorch's default.
"""
from typing import List, Tuple, Type, Union

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from .fused import bn_relu
from .registry import ArchSpec, register_arch


class FusableBasicBlock(BasicBlock):
    """torchvision's BasicBlock (same layers, parameters and state-dict keys) whose BN + ReLU
    pairs go through :func:`models.fused.bn_relu`: the same eager ops, or one fused op on the
    CPU bf16 fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu(self.bn1, self.conv1(x))
        return bn_relu(self.bn2, self.conv2(out), residual=identity)


class FusableBottleneck(Bottleneck):
    """torchvision's Bottleneck, BN + ReLU pairs through :func:`models.fused.bn_relu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu(self.bn1, self.conv1(x))
        out = bn_relu(self.bn2, self.conv2(out))
        return bn_relu(self.bn3, self.conv3(out), residual=identity)


Block = Type[Union[FusableBasicBlock, FusableBottleneck]]

STEM_WIDTH = 16
STAGE_WIDTHS = (16, 32, 64)


def make_stage(block: Block, in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """``num_blocks`` residual blocks; the first one carries the stride and the shortcut conv."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    blocks = [block(in_planes, planes, stride, downsample)]
    blocks += [block(out_planes, planes) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def init_resnet_weights(module: nn.Module) -> None:
    """Kaiming normal (fan_out, relu) for convs, BN weight 1 and bias 0; Linear untouched."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class CifarResNetStem(nn.Module):
    """(B, 3, 32, 32) -> (B, 16 * expansion, 32, 32)."""

    def __init__(self, block: Block, layers: List[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.layer1 = make_stage(block, STEM_WIDTH, STAGE_WIDTHS[0], layers[0], stride=1)
        self.out_channels = STAGE_WIDTHS[0] * block.expansion
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(bn_relu(self.bn1, self.conv1(x)))


class CifarResNetBranch(nn.Module):
    """(B, 16 * expansion, 32, 32) -> (logits (B, C), feature (B, 64 * expansion))."""

    def __init__(self, block: Block, layers: List[int], num_classes: int):
        super().__init__()
        in_planes = STAGE_WIDTHS[0] * block.expansion
        self.layer2 = make_stage(block, in_planes, STAGE_WIDTHS[1], layers[1], stride=2)
        self.layer3 = make_stage(block, STAGE_WIDTHS[1] * block.expansion, STAGE_WIDTHS[2], layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = STAGE_WIDTHS[2] * block.expansion
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feature = torch.flatten(self.avgpool(self.layer3(self.layer2(x))), 1)
        return self.classifier(feature), feature


def register_cifar_resnet(name: str, block: Block, layers: List[int]) -> None:
    """Register one depth; the init does not depend on the topology for this family."""
    register_arch(ArchSpec(
        name=name,
        make_stem=lambda topology: CifarResNetStem(block, layers),
        make_branch=lambda num_classes, topology: CifarResNetBranch(block, layers, num_classes),
        feature_dim=STAGE_WIDTHS[2] * block.expansion,
        input_size=32,
        family="cifar",
    ))


register_cifar_resnet("resnet32", FusableBasicBlock, [5, 5, 5])
register_cifar_resnet("resnet56", FusableBasicBlock, [9, 9, 9])
register_cifar_resnet("resnet110", FusableBottleneck, [12, 12, 12])
