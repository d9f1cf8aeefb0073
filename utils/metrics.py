"""Accuracy counting, calibration (NLL, expected calibration error) and running averages."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

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
    """(V,) float64 on ``device`` from a number (V = 1, a fill, no host-to-device copy) or a
    tensor of V values (flattened)."""
    if torch.is_tensor(value):
        return value.detach().to(device=device, dtype=torch.float64).reshape(-1)
    return torch.full((1,), float(value), dtype=torch.float64, device=device)


def reduce_accuracy(counter: AccuracyCounter, device: torch.device,
                    extras: Sequence[Union[float, torch.Tensor]] = ()):
    """Sum hit counts (and ``extras``: numbers or tensors, e.g. loss or calibration sums kept on
    the device) over ranks -> (top1 %, top5 %, total, summed extras); the device is read once.

    The summed extras come back as one flat list: a tensor extra of V values gives V numbers
    (row-major), in the order of ``extras``.
    """
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


# ----------------------------------------------------------------------------- calibration

ECE_BINS = 15  # equal-width confidence bins, the usual choice since Guo et al. (2017)


@torch.no_grad()
def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under softmax(``logits``); (B, C), (B,)."""
    return float(F.cross_entropy(logits.double(), targets))


@torch.no_grad()
def calibration_bins(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """(3, bins) float64 per confidence bin: sample count, sum of confidences, number correct.

    The confidence of a sample is its largest softmax probability; bin m holds
    confidences in ((m - 1) / bins, m / bins] (numbered from 1), bin 1 also 0 itself.
    """
    probs = logits.double().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    index = (confidence * bins).ceil().long().sub(1).clamp(0, bins - 1)
    out = torch.zeros(3, bins, dtype=torch.float64, device=logits.device)
    out[0].index_add_(0, index, torch.ones_like(confidence))
    out[1].index_add_(0, index, confidence)
    out[2].index_add_(0, index, predicted.eq(targets).double())
    return out


def ece_from_bins(stats: torch.Tensor) -> float:
    """Expected calibration error (a fraction in [0, 1]) of :func:`calibration_bins`'s (3, bins) sums:
    sum over bins of |accuracy - mean confidence| weighted by the bin's share of the samples."""
    total = float(stats[0].sum())
    if total == 0:
        return 0.0
    return float((stats[2] - stats[1]).abs().sum()) / total


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE (a fraction in [0, 1]) of softmax(``logits``) (B, C) against ``targets`` (B,) with ``bins``
    equal-width confidence bins."""
    return ece_from_bins(calibration_bins(logits, targets, bins))


class CalibrationCounter:
    """Summed NLL and confidence-bin statistics of several heads (networks, ensemble), reducible over ranks.

    One float64 tensor (heads, 1 + 3 * bins): the summed NLL, then :func:`calibration_bins`'s rows.
    """

    def __init__(self, num_heads: int, bins: int = ECE_BINS) -> None:
        self.num_heads, self.bins = num_heads, bins
        self.sums: Optional[torch.Tensor] = None

    @torch.no_grad()
    def update(self, logits_list: Sequence[torch.Tensor], targets: torch.Tensor) -> None:
        rows = []
        for logits in logits_list:
            nll = F.cross_entropy(logits.double(), targets, reduction="sum").reshape(1)
            rows.append(torch.cat([nll, calibration_bins(logits, targets, self.bins).flatten()]))
        batch = torch.stack(rows)
        self.sums = batch if self.sums is None else self.sums + batch

    def device_sums(self, device: torch.device) -> torch.Tensor:
        """The sums (heads, 1 + 3 * bins) float64 on ``device``, not read (to pack with other sums)."""
        if self.sums is None:
            return torch.zeros(self.num_heads, 1 + 3 * self.bins, dtype=torch.float64, device=device)
        return self.sums.to(device=device, dtype=torch.float64)

    def from_values(self, values: Sequence[float]) -> Tuple[List[float], List[float]]:
        """(mean NLL per head, ECE (%) per head) from :meth:`device_sums` read to the host as a flat
        list (summed over ranks); plain Python, no further device read."""
        width = 1 + 3 * self.bins
        nll, ece = [], []
        for h in range(self.num_heads):
            row = values[h * width:(h + 1) * width]
            counts, confidences, correct = (row[1 + j * self.bins:1 + (j + 1) * self.bins] for j in range(3))
            samples = sum(counts)
            nll.append(row[0] / max(samples, 1.0))
            ece.append(100.0 * sum(abs(a - c) for a, c in zip(correct, confidences)) / samples if samples else 0.0)
        return nll, ece

    def reduce(self, device: torch.device) -> Tuple[List[float], List[float]]:
        """Sum over ranks -> (mean NLL per head, ECE (%) per head); the device is read once."""
        sums = self.device_sums(device if device.type == "cuda" else torch.device("cpu")).clone()  # NCCL: CUDA
        du.all_reduce_sum(sums)
        return self.from_values(sums.flatten().tolist())
