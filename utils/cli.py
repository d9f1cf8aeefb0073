"""Entry-point wrapper: user errors become one line on stderr and exit code 2."""
import sys
from typing import Callable, List, Optional

from utils.errors import UserError, user_message


def run_main(main: Callable[[Optional[List[str]]], Optional[int]], argv: Optional[List[str]] = None) -> None:
    """Call ``main(argv)`` and exit with its return code.

    A :class:`UserError` prints ``error: <message>`` on stderr and exits with the
    error's code (2) without a traceback; anything else is a bug and keeps its
    traceback.
    """
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    sys.exit(code or 0)
