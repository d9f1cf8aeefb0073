"""Accuracy counting and running averages."""
from typing import Dict, List, Optional, Sequence

import torch


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
