"""GPUs that are not there, for CPU tests of the CUDA and NCCL set-up paths.

:func:`fake_gpus` makes ``torch.cuda`` report ``count`` GPUs of compute capability
``capability`` and records instead of doing: ``torch.cuda.set_device`` calls, and the
keyword arguments of ``torch.distributed.init_process_group`` (never really called).
It also clears the launcher variables, so each test sets the environment it describes.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "CUDA_VISIBLE_DEVICES")


@dataclass
class FakeCuda:
    """What the code under test asked of CUDA and torch.distributed."""

    set_device: List[torch.device] = field(default_factory=list)
    init: List[Dict[str, Any]] = field(default_factory=list)


def fake_gpus(monkeypatch, count: int = 2, capability: Tuple[int, int] = (8, 0)) -> FakeCuda:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.set_device.append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.init.append(kwargs))
    return calls
