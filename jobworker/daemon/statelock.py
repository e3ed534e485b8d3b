"""One daemon per state directory: an exclusive ``flock`` on ``<state-dir>/lock``.

Taken in ``makeService``, before anything in the directory is touched; the descriptor is
inherited across twistd's daemonizing fork, so the lock lives as long as the daemon.  The
holder writes its pid into the file once it runs (``write_pid``), so a second daemon can
say whom it found.
"""

from __future__ import annotations

import fcntl
import os

from twisted.application import service


class StateLocked(Exception):
    """Another daemon holds the state directory."""


class StateLock:
    """The lock on one state directory, held from ``acquire`` for the process's life."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "lock")
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise L{StateLocked} naming the holder's pid; OSError if the
        file cannot be opened."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateLocked(f"another jobworker daemon (pid {holder}) is using "
                              f"{os.path.dirname(self.path)}") from None
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def write_pid(self, pid: int | None = None) -> None:
        """Record the holder (after twistd's fork: the daemon's own pid)."""
        if self._fd < 0:
            return
        data = f"{pid if pid is not None else os.getpid()}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class StateLockService(service.Service):
    """Writes the daemon's pid into the lock file once it runs (after twistd's fork)."""

    def __init__(self, lock: StateLock) -> None:
        self.lock = lock

    def startService(self) -> None:
        self.lock.write_pid()
        super().startService()
