"""Stopping a run on request: SIGTERM/SIGINT (which the run loop agrees on over all ranks), and a test hook that
sends a signal."""
import os
import signal
from typing import Any, Dict, Optional, Tuple

# Test hook: "N", "N:SIGNAME" (default KILL) or "N:SIGNAME:RANK" makes the process (only the
# one of global rank RANK, when given) send itself that signal right after its N-th training
# step (counted from the start of the process), to test recovery from kill -9, graceful stops
# at a chosen step and the death of one process of a group.
SIGNAL_ENV = "MCL_DEBUG_SIGNAL_AFTER_STEPS"


def debug_signal(rank: int) -> Optional[Tuple[int, int]]:
    """(step, signal) of the test hook for the process of ``rank``, or None."""
    value = os.environ.get(SIGNAL_ENV)
    if not value:
        return None
    steps, _, rest = value.partition(":")
    name, _, only_rank = rest.partition(":")
    if only_rank and int(only_rank) != rank:
        return None
    return int(steps), getattr(signal, "SIG" + (name or "KILL").upper().removeprefix("SIG"))


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits.

    The first signal's name is kept: a SIGTERM forwarded by a launcher after a terminal
    Ctrl-C does not turn the SIGINT (exit 130) into a SIGTERM (exit 0). A second Ctrl-C
    stops at once.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None and signum == signal.SIGTERM:
            return
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> Optional[int]:
        """The signal this process received, or None. The run loop agrees on it over all ranks
        (utils/step_log.py), so that every rank stops after the same step."""
        return self.signum
