"""A tiny CIFAR ResNet (one block per stage, "resnet8") for the L-MCL script tests only.

Registered on import, in the plain registry and as an L-MCL architecture, so the script tests
can train L-MCL for a few epochs in seconds; the processes those tests start are forked from the test
process (tests/script_helpers.py), or import this module first.
"""
from models import lmcl, resnet_cifar
from models.registry import registered_names

TINY_ARCH = "resnet8"

if TINY_ARCH not in registered_names():
    resnet_cifar.register_cifar_resnet(TINY_ARCH, resnet_cifar.FusableBasicBlock, [1, 1, 1])
    lmcl._register_cifar_resnet(TINY_ARCH, resnet_cifar.FusableBasicBlock, 1)
