"""Accuracy counting and running averages."""
from typing import Dict, List, Optional, Sequence, Union

import torch

from utils import distributed as du


@torch.no_grad()
def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[int]:
    """Number of samples whose target is among the top-k logits, for each k.

    logits (B, C), targets (B,). k larger than C counts every sample as correct.
    """
    maxk = min(max(ks), logits.size(1))
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(targets.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


class SumMeter:
    """Weighted sums of named scalars; ``averages()`` divides by the total weight."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}
        self.count = 0

    def update(self, values: Dict[str, float], n: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.count += n

    def averages(self) -> Dict[str, float]:
        return {name: s / max(self.count, 1) for name, s in self.sums.items()}

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = dict(state["sums"])
        self.count = int(state["count"])


class AccuracyCounter:
    """Top-1/top-5 hit counts for several heads (networks, ensemble).

    Counts accumulate as one tensor on the logits' device, so a training step does
    not wait for the GPU; reading ``top1``/``top5`` (epoch end, checkpoint, progress
    bar) copies them to the host.
    """

    def __init__(self, num_heads: int) -> None:
        self.num_heads = num_heads
        self._counts: Optional[torch.Tensor] = None  # (2, num_heads): top-1 row, top-5 row
        self.total = 0

    @torch.no_grad()
    def update(self, logits_list: Sequence[torch.Tensor], targets: torch.Tensor) -> None:
        hits = []
        for logits in logits_list:
            k = min(5, logits.size(1))
            hit = logits.topk(k, dim=1).indices.eq(targets.view(-1, 1))
            hits.append(torch.stack([hit[:, :1].any(dim=1).sum(), hit.any(dim=1).sum()]))
        counts = torch.stack(hits, dim=1)
        self._counts = counts if self._counts is None else self._counts.to(counts.device) + counts
        self.total += int(targets.size(0))

    def _row(self, row: int) -> List[int]:
        if self._counts is None:
            return [0] * self.num_heads
        return [int(v) for v in self._counts[row].tolist()]

    def counts(self, device: torch.device) -> torch.Tensor:
        """Hit counts (2, num_heads), top-1 row then top-5 row, as float64 on ``device``; not read."""
        if self._counts is None:
            return torch.zeros(2, self.num_heads, dtype=torch.float64, device=device)
        return self._counts.to(device=device, dtype=torch.float64)

    @property
    def top1(self) -> List[int]:
        return self._row(0)

    @property
    def top5(self) -> List[int]:
        return self._row(1)


    def state_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self._counts = torch.tensor([list(state["top1"]), list(state["top5"])], dtype=torch.long)
        self.num_heads = len(state["top1"])
        self.total = int(state["total"])


def _float64_row(value: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """(1,) float64 on ``device`` from a number (a fill, no host-to-device copy) or a one-value tensor."""
    if torch.is_tensor(value):
        return value.detach().to(device=device, dtype=torch.float64).reshape(1)
    return torch.full((1,), float(value), dtype=torch.float64, device=device)


def reduce_accuracy(counter: AccuracyCounter, device: torch.device,
                    extras: Sequence[Union[float, torch.Tensor]] = ()):
    """Sum hit counts (and ``extras``: numbers or one-value tensors, e.g. loss sums kept on the
    device) over ranks -> (top1 %, top5 %, total, summed extras); the device is read once."""
    dev = device if device.type == "cuda" else torch.device("cpu")  # NCCL needs CUDA tensors
    packed = torch.cat([counter.counts(dev).flatten(), _float64_row(counter.total, dev),
                        *(_float64_row(e, dev) for e in extras)])
    du.all_reduce_sum(packed)
    vals = packed.tolist()
    n = counter.num_heads
    total = max(vals[2 * n], 1.0)
    return ([100.0 * v / total for v in vals[:n]], [100.0 * v / total for v in vals[n:2 * n]],
            int(vals[2 * n]), vals[2 * n + 1:])


def reduced_means(acc: AccuracyCounter, meter: SumMeter, keys: Sequence[str],
                  device: torch.device) -> Dict[str, object]:
    """{key: mean over all ranks' samples for each of ``keys``, "top1": [%], "top5": [%]} in one reduction."""
    sums = [meter.sums.get(k, 0.0) for k in keys]
    top1, top5, _, extras = reduce_accuracy(acc, device, sums + [meter.count])
    count = max(extras[-1], 1.0)
    record: Dict[str, object] = {k: extras[i] / count for i, k in enumerate(keys)}
    record.update(top1=top1, top5=top5)
    return record
