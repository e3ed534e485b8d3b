"""How the daemon fails to start: one clear line and exit status 1, never a usage dump or a
traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


class StartupFailed(SystemExit, Exception):
    """Exit status 1, the reason already written.  Also an ``Exception``: a daemonizing
    twistd reports only those to its waiting parent, which otherwise waits forever."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> NoReturn:
    """One clear line and a non-zero exit: no usage dump, no traceback."""
    line = f"twistd jobworker: {message}\n"
    sys.stderr.write(line)
    if sys.__stderr__ is not None and sys.stderr is not sys.__stderr__:
        # Once logging has started, sys.stderr goes to the log: tell the operator too.
        sys.__stderr__.write(line)
        sys.__stderr__.flush()
    raise StartupFailed(message)
