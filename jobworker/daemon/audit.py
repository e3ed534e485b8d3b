"""The audit trail: one JSON line per state-changing request and per refusal."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from jobworker.wire.timestamps import iso8601


class AuditLog:
    """Appends to ``<state-dir>/audit.log``.

    Each entry is a single ``write(2)`` on an ``O_APPEND`` descriptor, done before the
    reply is sent: it is in the kernel (and so survives a daemon crash) by the time
    the client hears the outcome.
    """

    def __init__(self, path: str, now: Callable[[], float]) -> None:
        self.path = path
        self._now = now
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def record(self, *, identity: str, role: str | None, method: str, outcome: str,
               job_id: str | None = None, **extra: Any) -> None:
        entry = {"time": iso8601(self._now()), "identity": identity, "role": role,
                 "method": method, "job_id": job_id, "outcome": outcome, **extra}
        line = json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
