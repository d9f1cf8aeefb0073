"""HCGNet-A1 and HCGNet-A2 for 32x32 inputs.

Yang et al., "Gated Convolutional Networks with Hybrid Connectivity for Image
Classification", AAAI 2020. The network is a DenseNet-like stack of three hybrid
blocks of 8 SMG modules each, with two gated transitions between them:

    conv0 (3 -> 2*g1) | block1, transition1 || block2, transition2, block3,
    BN + ReLU + global average pool, Linear

An SMG module (and a transition) has two parts:

- a *squeeze cell*: pre-activation 1x1 conv then pre-activation 3x3 conv,
  giving ``x`` of ``C`` channels;
- a *gate cell* that returns ``x * forget_gate(x) + excitation(x)``: the forget
  gate is a sigmoid channel gate computed from attention-pooled ``x``; the
  multi-scale excitation attention-pools the outputs of a 3x3 and a dilated
  3x3 depthwise conv and mixes the two pooled vectors with per-channel softmax
  weights. Both parts produce ``(B, C, 1, 1)`` tensors broadcast over space.

An SMG module concatenates its input with the gate cell output (dense
connectivity); a transition does not and halves the resolution.

The project splits every network into ``stem`` (up to and including the first
transition, shared by all branches of a branched cohort) and ``branch`` (the
rest). The original whole network and its branched variant have the same layers
on both sides of that split, and both use PyTorch's default initialisation, so
``topology`` does not change what is built here.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.registry import TOPOLOGIES, ArchSpec, register_arch

SMG_PER_BLOCK = 8
BOTTLENECK_FACTOR = 4  # SMG 1x1 conv width = 4 * growth rate
SMG_SQUEEZE_GROUPS = 4  # groups of the SMG 3x3 conv
COMPRESSION = 0.5  # transition output channels = int(in * 0.5)
SMG_FACTORS = (2, 2)  # (forget_factor, reduction_factor) inside SMG modules
TRANSITION_FACTORS = (4, 4)  # the same for transitions

GROWTH_RATES = {
    "hcgnet_A1": (12, 24, 36),
    "hcgnet_A2": (24, 36, 64),
}


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def spatial_softmax(context_logits: Tensor) -> Tensor:
    """Softmax over all spatial positions: (B, 1, H, W) -> (B, 1, H, W)."""
    b, _, h, w = context_logits.shape
    return F.softmax(context_logits.flatten(1), dim=1).reshape(b, 1, h, w)


def attention_pool(x: Tensor, context_logits: Tensor) -> Tensor:
    """Sum of ``x`` over space weighted by softmax(context): (B, C, H, W) -> (B, C, 1, 1)."""
    return (x * spatial_softmax(context_logits)).sum(dim=(2, 3), keepdim=True)


def mix_two_scales(
    pooled_a: Tensor, pooled_b: Tensor, logits_a: Tensor, logits_b: Tensor
) -> Tensor:
    """Per-channel softmax mixture of two pooled vectors.

    pooled_*: (B, C, 1, 1); logits_*: (B, C, 1, 1) -> (B, C, 1, 1), where for
    each channel the two weights softmax(logits_a, logits_b) sum to one.
    """
    weights = F.softmax(torch.stack([logits_a, logits_b], dim=1), dim=1)
    return weights[:, 0] * pooled_a + weights[:, 1] * pooled_b


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------


class PreActConv(nn.Sequential):
    """BatchNorm -> ReLU -> Conv2d without bias: (B, in, H, W) -> (B, out, H', W')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )


class SqueezedVector(nn.Module):
    """1x1 conv -> BatchNorm1d -> tanh on a pooled vector: (B, C, 1, 1) -> (B, C', 1, 1)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, pooled: Tensor) -> Tensor:
        squeezed = torch.tanh(self.norm(self.fc(pooled).flatten(1)))
        return squeezed[:, :, None, None]


class MultiScaleExcitation(nn.Module):
    """Attention-pooled 3x3 and dilated 3x3 depthwise responses, softly mixed.

    (B, C, H, W) -> (B, C, 1, 1).
    """

    def __init__(self, channels: int, reduction_factor: int) -> None:
        super().__init__()
        hidden = 2 * channels // reduction_factor
        self.conv_3x3 = PreActConv(channels, channels, 3, padding=1, groups=channels)
        self.conv_dilated = PreActConv(
            channels, channels, 3, padding=2, dilation=2, groups=channels
        )
        self.context_3x3 = nn.Conv2d(channels, 1, kernel_size=1)
        self.context_dilated = nn.Conv2d(channels, 1, kernel_size=1)
        self.attention = SqueezedVector(2 * channels, hidden)
        self.select_3x3 = nn.Conv2d(hidden, channels, kernel_size=1)
        self.select_dilated = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        small = self.conv_3x3(x)
        large = self.conv_dilated(x)
        pooled_small = attention_pool(small, self.context_3x3(small))
        pooled_large = attention_pool(large, self.context_dilated(large))
        attention = self.attention(torch.cat([pooled_small, pooled_large], dim=1))
        return mix_two_scales(
            pooled_small,
            pooled_large,
            self.select_3x3(attention),
            self.select_dilated(attention),
        )


class ForgetGate(nn.Module):
    """Sigmoid channel gate from the attention-pooled input: (B, C, H, W) -> (B, C, 1, 1)."""

    def __init__(self, channels: int, forget_factor: int) -> None:
        super().__init__()
        hidden = channels // forget_factor
        self.context = nn.Conv2d(channels, 1, kernel_size=1)
        self.squeeze = SqueezedVector(channels, hidden)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = attention_pool(x, self.context(x))
        return torch.sigmoid(self.expand(self.squeeze(pooled)))


class GateCell(nn.Module):
    """Update/forget gating: x * forget_gate(x) + excitation(x), (B, C, H, W) -> same."""

    def __init__(self, channels: int, forget_factor: int, reduction_factor: int) -> None:
        super().__init__()
        # Built before the forget gate: the original creates its layers in this
        # order, so a given seed draws the same initial weights.
        self.excitation = MultiScaleExcitation(channels, reduction_factor)
        self.forget_gate = ForgetGate(channels, forget_factor)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.forget_gate(x) + self.excitation(x)


class SMGModule(nn.Module):
    """Squeeze cell + gate cell, output appended to the input.

    (B, in_channels, H, W) -> (B, in_channels + growth_rate, H, W).
    """

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        width = BOTTLENECK_FACTOR * growth_rate
        self.squeeze = nn.Sequential(
            PreActConv(in_channels, width, 1),
            PreActConv(width, growth_rate, 3, padding=1, groups=SMG_SQUEEZE_GROUPS),
        )
        self.gate = GateCell(growth_rate, *SMG_FACTORS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.gate(self.squeeze(x))], dim=1)


class HybridBlock(nn.Sequential):
    """``num_modules`` SMG modules: (B, in, H, W) -> (B, in + num_modules * growth, H, W)."""

    def __init__(self, in_channels: int, growth_rate: int, num_modules: int) -> None:
        super().__init__(
            *[
                SMGModule(in_channels + i * growth_rate, growth_rate)
                for i in range(num_modules)
            ]
        )
        self.out_channels = in_channels + num_modules * growth_rate


class Transition(nn.Module):
    """Compressing, downsampling gated transition.

    (B, in_channels, H, W) -> (B, out_channels, ceil(H/2), ceil(W/2)); the 1x1 conv
    width removes half of the channels being dropped.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        width = in_channels - (in_channels - out_channels) // 2
        self.squeeze = nn.Sequential(
            PreActConv(in_channels, width, 1),
            PreActConv(width, out_channels, 3, stride=2, padding=1),
        )
        self.gate = GateCell(out_channels, *TRANSITION_FACTORS)

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.squeeze(x))


# ----------------------------------------------------------------------------
# Stem and branch
# ----------------------------------------------------------------------------


def compressed(channels: int) -> int:
    """Output channels of a transition fed ``channels`` channels."""
    return int(channels * COMPRESSION)


def stage_channels(growth_rates: Sequence[int]) -> List[int]:
    """Channel counts [stem conv, after T1, after T2, final feature]."""
    g1, g2, g3 = growth_rates
    c0 = 2 * g1
    c1 = compressed(c0 + SMG_PER_BLOCK * g1)
    c2 = compressed(c1 + SMG_PER_BLOCK * g2)
    return [c0, c1, c2, c2 + SMG_PER_BLOCK * g3]


class HCGNetStem(nn.Module):
    """conv0, hybrid block 1, transition 1: (B, 3, 32, 32) -> (B, C1, 16, 16)."""

    def __init__(self, growth_rates: Sequence[int]) -> None:
        super().__init__()
        g1 = growth_rates[0]
        c0, c1, _, _ = stage_channels(growth_rates)
        self.conv0 = nn.Conv2d(3, c0, kernel_size=3, padding=1, bias=False)
        self.block1 = HybridBlock(c0, g1, SMG_PER_BLOCK)
        self.transition1 = Transition(self.block1.out_channels, c1)
        self.out_channels = c1

    def forward(self, x: Tensor) -> Tensor:
        return self.transition1(self.block1(self.conv0(x)))


class HCGNetBranch(nn.Module):
    """Hybrid block 2, transition 2, hybrid block 3, BN-ReLU-pool, Linear.

    (B, C1, 16, 16) -> (logits (B, num_classes), feature (B, F)).
    """

    def __init__(self, growth_rates: Sequence[int], num_classes: int) -> None:
        super().__init__()
        _, g2, g3 = growth_rates
        _, c1, c2, feature_dim = stage_channels(growth_rates)
        self.block2 = HybridBlock(c1, g2, SMG_PER_BLOCK)
        self.transition2 = Transition(self.block2.out_channels, c2)
        self.block3 = HybridBlock(c2, g3, SMG_PER_BLOCK)
        self.norm = nn.BatchNorm2d(feature_dim)
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.block3(self.transition2(self.block2(h)))
        feature = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1).flatten(1)
        return self.classifier(feature), feature


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------


def _check_topology(topology: str) -> None:
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; valid: {', '.join(TOPOLOGIES)}")


def make_stem(growth_rates: Sequence[int], topology: str) -> HCGNetStem:
    """The shared part of HCGNet with these growth rates."""
    _check_topology(topology)
    return HCGNetStem(growth_rates)


def make_branch(growth_rates: Sequence[int], num_classes: int, topology: str) -> HCGNetBranch:
    """The per-network part of HCGNet with these growth rates."""
    _check_topology(topology)
    return HCGNetBranch(growth_rates, num_classes)


def _register(name: str) -> ArchSpec:
    rates = GROWTH_RATES[name]
    return register_arch(
        ArchSpec(
            name=name,
            make_stem=lambda topology: make_stem(rates, topology),
            make_branch=lambda num_classes, topology: make_branch(rates, num_classes, topology),
            feature_dim=stage_channels(rates)[-1],
            input_size=32,
            family="cifar",
        )
    )


HCGNET_A1 = _register("hcgnet_A1")
HCGNET_A2 = _register("hcgnet_A2")
