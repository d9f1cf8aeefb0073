"""Networks of the project and the cohorts that train them together.

Importing this package registers every architecture (docs/method.md §6), in the order
of the network table of docs/method.md §6.4.
"""
from typing import List

from . import resnet_cifar, wrn, shufflenetv2, hcgnet, resnet_imagenet  # noqa: F401  (registration)
from .cohort import (
    BranchedCohort,
    CohortError,
    IndependentCohort,
    SplitNet,
    build_cohort,
    get_model,
    resolve_topology,
)
from .complexity import count_multiply_adds, count_parameters
from .registry import registered_names


def available_architectures() -> List[str]:
    """Names of the registered architectures (torchvision names are accepted too)."""
    return registered_names()


__all__ = [
    "BranchedCohort",
    "CohortError",
    "IndependentCohort",
    "SplitNet",
    "available_architectures",
    "build_cohort",
    "count_multiply_adds",
    "count_parameters",
    "get_model",
    "resolve_topology",
]
