"""The audit trail: one JSON line per decision and per outcome of each state-changing
request, and one per refusal."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from jobworker.wire.timestamps import iso8601


class AuditLog:
    """Appends to ``<state-dir>/audit.log``.

    Each entry is a single ``write(2)`` on an ``O_APPEND`` descriptor, done before the
    reply is sent: it is in the kernel (and so survives a daemon crash) by the time the
    client hears the outcome.  A write that fails never fails the request: it is logged
    (``audit.write_failed``) and counted (``failures``), and the request goes on, so its
    reply is still the truth.  A log removed or rotated away is opened again by path at the
    next write (and on ``reopen``, at SIGHUP).
    """

    log = Logger()

    def __init__(self, path: str, now: Callable[[], float]) -> None:
        self.path = path
        self._now = now
        self.failures = 0
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        """Open the path again (after log rotation); on failure keep writing where we did."""
        try:
            self._swap(self._open())
        except OSError as e:
            self._failed("reopen", e)

    def _swap(self, fd: int) -> None:
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def record(self, *, identity: str, role: str | None, method: str, outcome: str,
               job_id: str | None = None, **extra: Any) -> bool:
        """Write one entry; whether it was written."""
        entry = {"time": iso8601(self._now()), "identity": identity, "role": role,
                 "method": method, "job_id": job_id, "outcome": outcome, **extra}
        line = (json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n").encode()
        try:
            if self._moved():
                self._swap(self._open())
            written = os.write(self._fd, line)
        except OSError as e:
            self._failed(method, e)
            return False
        if written != len(line):  # a short append: the disk filled as we wrote
            self._failed(method, OSError(f"wrote {written} of {len(line)} bytes"))
            return False
        return True

    def _moved(self) -> bool:
        """Whether the path no longer names the file we write (removed, or rotated away):
        one stat per entry, on start and stop only."""
        if self._fd < 0:
            return True
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return True
        ours = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) != (ours.st_dev, ours.st_ino)

    def _failed(self, what: str, error: OSError) -> None:
        self.failures += 1
        self.log.critical(
            "audit.write_failed path={path} entry={what} failures={failures}: {error}",
            path=self.path, what=what, failures=self.failures,
            error=error.strerror or str(error))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
