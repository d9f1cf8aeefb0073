"""Accuracy counting and running averages."""
from typing import Dict, Iterable, List, Sequence

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
    """Top-1/top-5 hit counts for several heads (networks, ensemble)."""

    def __init__(self, num_heads: int) -> None:
        self.top1 = [0] * num_heads
        self.top5 = [0] * num_heads
        self.total = 0

    def update(self, logits_list: Iterable[torch.Tensor], targets: torch.Tensor) -> None:
        for i, logits in enumerate(logits_list):
            c1, c5 = topk_correct(logits, targets, (1, 5))
            self.top1[i] += c1
            self.top5[i] += c5
        self.total += int(targets.size(0))

    def add_counts(self, top1: List[int], top5: List[int], total: int) -> None:
        self.top1 = [a + b for a, b in zip(self.top1, top1)]
        self.top5 = [a + b for a, b in zip(self.top5, top5)]
        self.total += total

    def percents(self) -> Dict[str, List[float]]:
        denom = max(self.total, 1)
        return {
            "top1": [100.0 * c / denom for c in self.top1],
            "top5": [100.0 * c / denom for c in self.top5],
        }

    def state_dict(self) -> dict:
        return {"top1": list(self.top1), "top5": list(self.top5), "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.top1, self.top5, self.total = list(state["top1"]), list(state["top5"]), int(state["total"])
