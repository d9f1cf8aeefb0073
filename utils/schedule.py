"""Learning-rate schedules of the original, stepped once per epoch."""
import math
from bisect import bisect_right
from typing import Sequence

LR_TYPES = ("cosine", "multistep")


def lr_at_epoch(epoch: int, init_lr: float, lr_type: str, epochs: int, milestones: Sequence[int]) -> float:
    """Learning rate for ``epoch`` (0-based).

    cosine: init_lr * 0.5 * (1 + cos(pi * epoch / epochs));
    multistep: init_lr * 0.1 ** (number of milestones <= epoch).
    """
    if lr_type == "cosine":
        return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if lr_type == "multistep":
        return init_lr * 0.1 ** bisect_right(sorted(milestones), epoch)
    raise ValueError(f"unknown lr type {lr_type!r}; valid: {', '.join(LR_TYPES)}")


def set_lr(optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group (the original set only the first)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
