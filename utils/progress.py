"""Progress bars for work that takes long (evaluation, kNN features, folder indexing) and durations.

A bar is shown only when asked (no --no-progress, main process) and stdout is a terminal,
the same rule as the training bar of utils/loop.py: logs written to a file stay clean.
"""
import sys
from typing import Iterable, Optional, TypeVar

T = TypeVar("T")


def wants_bar(enabled: bool) -> bool:
    """True when a bar should be drawn: ``enabled`` and stdout is a terminal."""
    return enabled and sys.stdout.isatty()


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "", enabled: bool = True) -> Iterable[T]:
    """``iterable`` itself, or wrapped in a tqdm bar that disappears when done (see :func:`wants_bar`)."""
    if not wants_bar(enabled):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def format_duration(seconds: float) -> str:
    """A short duration: ``45s``, ``12m05s``, ``3h07m``, ``2d04h``."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
