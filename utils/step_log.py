"""The logged values of training steps, kept on the device until the run loop reads them.

A step only queues its values (loss terms, as one small device tensor); nothing in it waits
for the device. Every few steps the loop reads all queued values at once: that read is the
loop's one host synchronisation. Under a process group the same read carries one all-reduce
that tells every rank whether any rank saw a NaN or infinity and which stop signal any rank
received, so that all ranks stop after the same step, together.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from utils import distributed as du


@dataclass
class Reading:
    """What a read gives the loop.

    ``steps``: (batches of the epoch done before the step, {term: value}, local batch size)
    of each step queued since the last read, oldest first; ``signum``: the stop signal any
    rank received (this process's own without a group), or None; ``non_finite``: a NaN or
    infinity among the values of any rank.
    """

    steps: List[Tuple[int, Dict[str, float], int]]
    signum: Optional[int]
    non_finite: bool


class PendingSteps:
    """The values of the steps since the last read (``names`` order), on the device."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._rows: List[torch.Tensor] = []  # each (len(names),) float32
        self._meta: List[Tuple[int, int]] = []  # (step, batch size)

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, step: int, values: torch.Tensor, batch: int) -> None:
        """Queue one step's values, (len(names),), without reading them."""
        self._rows.append(values.detach().float())
        self._meta.append((step, batch))

    def read(self, signum: Optional[int], device: torch.device) -> Reading:
        """Copy every queued value to the host (one synchronisation) and empty the queue; under a process
        group every rank must call it at the same step (it all-reduces the non-finite and stop flags)."""
        width = len(self.names)
        rows = torch.stack(self._rows) if self._rows else torch.zeros((0, width), device=device)
        meta, self._rows, self._meta = self._meta, [], []
        if du.world_size() > 1:
            flags = torch.stack([(~torch.isfinite(rows)).any().double(),
                                 torch.full((), float(signum or 0), dtype=torch.float64, device=rows.device)])
            du.all_reduce_max(flags)
            host = torch.cat([rows.double().flatten(), flags]).tolist()
            flat, (any_bad, agreed) = host[:-2], host[-2:]
            non_finite, signum = any_bad > 0, int(agreed) or None
        else:
            flat = rows.flatten().tolist()
            non_finite = not all(math.isfinite(v) for v in flat)
        steps = [(step, dict(zip(self.names, flat[i * width:(i + 1) * width])), batch)
                 for i, (step, batch) in enumerate(meta)]
        return Reading(steps, signum, non_finite)
