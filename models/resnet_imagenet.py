"""ImageNet ResNet-18/34: torchvision's definition, split after layer2.

Submodule names follow torchvision so that stripping the ``stem.`` / ``branch.``
prefix of a SplitNet's state_dict gives torchvision's keys:
stem = conv1, bn1, maxpool, layer1, layer2; branch = layer3, layer4, avgpool, fc (ReLU has no state).
Init as torchvision (zero_init_residual=False): convs Kaiming normal (fan_out, relu),
BN weight 1 / bias 0, Linear at PyTorch's default. BN + ReLU pairs go through
models.fused.bn_relu (eager ops, fused only on the CPU bf16 fast path).
"""
from typing import List, Tuple

import torch
import torch.nn as nn
from .fused import bn_relu
from .registry import ArchSpec, register_arch
from .resnet_cifar import FusableBasicBlock as BasicBlock, init_resnet_weights, make_stage

FEATURE_DIM = 512 * BasicBlock.expansion


class ImageNetResNetStem(nn.Module):
    """(B, 3, 224, 224) -> (B, 128, 28, 28)."""

    def __init__(self, layers: List[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_stage(BasicBlock, 64, 64, layers[0], stride=1)
        self.layer2 = make_stage(BasicBlock, 64, 128, layers[1], stride=2)
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        return self.layer2(self.layer1(x))


class ImageNetResNetBranch(nn.Module):
    """(B, 128, 28, 28) -> (logits (B, C), feature (B, 512))."""

    def __init__(self, layers: List[int], num_classes: int):
        super().__init__()
        self.layer3 = make_stage(BasicBlock, 128, 256, layers[2], stride=2)
        self.layer4 = make_stage(BasicBlock, 256, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(FEATURE_DIM, num_classes)
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feature = torch.flatten(self.avgpool(self.layer4(self.layer3(x))), 1)
        return self.fc(feature), feature


def register_imagenet_resnet(name: str, layers: List[int]) -> None:
    register_arch(ArchSpec(
        name=name,
        make_stem=lambda topology: ImageNetResNetStem(layers),
        make_branch=lambda num_classes, topology: ImageNetResNetBranch(layers, num_classes),
        feature_dim=FEATURE_DIM,
        input_size=224,
        family="imagenet",
    ))


register_imagenet_resnet("resnet18", [2, 2, 2, 2])
register_imagenet_resnet("resnet34", [3, 4, 6, 3])
