"""Access to the L-MCL authors' reference cases in tests/fixtures/lmcl/ (see its README.md).

The file holds the authors' code's values on fixed inputs, run on CPU in float64
(github.com/winycg/L-MCL at commit 2c0901efbee5ef35e90bcae751183a616bf806fa).
"""
import functools
import math
import os
from typing import Any, Dict

import torch

from tests import ROOT

FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures", "lmcl")
TRAIN_ITER = "train_iter_lmcl_resnet32_cifar_n2_b16"


@functools.lru_cache(maxsize=1)
def reference_cases() -> Dict[str, Any]:
    """All cases of reference_cases.pt (cached: treat as read-only, clone before changing a tensor)."""
    return torch.load(os.path.join(FIXTURE_DIR, "reference_cases.pt"), weights_only=True)


def unpack_init(packed: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """One module's packed initial state (``init[module]``) -> its state dict, float64."""
    state = {}
    for key, offset in packed["offset"].items():
        shape = [int(s) for s in packed["shape"][key].split(",")] if packed["shape"][key] else []
        state[key] = packed["flat_fp16"][offset:offset + math.prod(shape)].view(shape).double()
    state.update({key: torch.tensor(value) for key, value in packed["int_entries"].items()})
    return state


def train_iter_inputs() -> torch.Tensor:
    """The exact float64 images of the training-iteration case, (16, 3, 32, 32).

    ``batch.inputs`` of reference_cases.pt is only their float32 rounding.
    """
    exact = torch.load(os.path.join(FIXTURE_DIR, "train_iter_inputs_float64.pt"), weights_only=True)["inputs"]
    assert torch.equal(exact.float(), reference_cases()[TRAIN_ITER]["batch"]["inputs"])
    return exact
