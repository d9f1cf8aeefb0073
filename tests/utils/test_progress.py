"""utils/progress.py: bars only on a terminal when asked; short durations for the ETA."""
import sys

import pytest

from utils.progress import format_duration, progress


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (44.6, "45s"), (725, "12m05s"), (3 * 3600 + 7 * 60, "3h07m"),
                                          (2 * 86400 + 4 * 3600 + 59, "2d04h")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_a_bar_only_on_a_terminal_and_when_asked(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert progress(items, 3, "x", enabled=True) is items
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert progress(items, 3, "x", enabled=False) is items
    bar = progress(items, 3, "x", enabled=True)
    assert bar is not items and list(bar) == items
