"""Registry from architecture name to how to build it.

Every network of the project is split in two parts so that one definition serves
both cohort topologies of the original:

- ``stem``: input image ``(B, 3, H, W)`` -> intermediate activation ``h``;
- ``branch``: ``h`` -> ``(logits (B, C), feature (B, F))``, where ``feature`` is the
  globally pooled penultimate activation.

A whole network is ``branch(stem(x))``; the branched cohort shares one stem
between N branches. ``topology`` ("independent" or "branched") is passed to the
builders because the original initialises some families differently in the two
cases (see docs/method.md §6.4).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch.nn as nn

from utils.errors import ConfigError

TOPOLOGIES = ("independent", "branched")


class CohortError(ConfigError, ValueError):
    """A bad architecture name, cohort size or topology (a ValueError the user can fix)."""


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture.

    make_stem(topology) -> nn.Module
    make_branch(num_classes, topology) -> nn.Module returning (logits, feature)
    """

    name: str
    make_stem: Callable[[str], nn.Module]
    make_branch: Callable[[int, str], nn.Module]
    feature_dim: int
    input_size: int  # 32 for the CIFAR family, 224 for ImageNet
    family: str  # "cifar" or "imagenet"


_REGISTRY: Dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` under ``spec.name``; names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registered_names() -> List[str]:
    """Names of the registered architectures, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> ArchSpec:
    """The spec of ``name``; a ValueError lists the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; valid: {', '.join(registered_names())}"
        ) from None
