"""Streaming a job's log to a client, from any offset, optionally following it live.

Each stream is a push producer behind its connection (``StreamFanout``): while the
connection's transport is paused it reads nothing, so however slow a follower is, the
daemon holds at most one chunk for it.  New output wakes followers through the
``FileWatcher``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from jobworker.daemon.call import Call
from jobworker.daemon.stream import ReplyStream
from jobworker.daemon.watcher import FileWatcher
from jobworker.jobs.job import Job
from jobworker.jobs.stored import StoredJob
from jobworker.wire.errors import NotFound

CHUNK_SIZE = 256 * 1024
#: Offsets from here on are past the end of any file the kernel can hold (pread refuses
#: them with EINVAL or EOVERFLOW rather than reading nothing).
_FAR = 2**62


class LogStream(ReplyStream):
    """Sends one log file from ``offset`` as chunk frames, then finishes.

    Without ``follow`` it ends at the file's current end; with ``follow`` it ends once
    the job has ended and every byte up to the end of the file has been sent.
    """

    log = Logger()

    def __init__(self, call: Call, job: Job | StoredJob, path: str, offset: int, follow: bool,
                 watcher: FileWatcher | None, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(call)
        self._job = job
        self._path = path
        self.offset = offset
        self._follow = follow
        self._watcher = watcher
        self._chunk_size = chunk_size
        self._fd = -1
        self._ended = False
        self._unwatch: Callable[[], None] | None = None
        self._ended_d: Deferred[Any] | None = None
        self._done: Deferred[int] = Deferred(lambda _: self._close())

    def start(self) -> Deferred[int]:
        """Begin sending; the Deferred fires with the final offset."""
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NotFound(f"log of job {self._job.id} is unavailable: {e.strerror}") from None
        self._call.streams.add(self)
        if self._follow and self._watcher is not None:
            self._unwatch = self._watcher.watch(self._path, self._wake)
            self._ended_d = self._job.when_ended()
            self._ended_d.addCallbacks(self._job_ended, lambda _: None)
        self._pump()
        return self._done

    def _job_ended(self, record: Any) -> None:
        self._ended_d = None
        self._ended = True
        self._pump()

    def _wake(self) -> None:
        self._pump()

    def _send_next(self) -> bool:
        try:
            data = os.pread(self._fd, self._chunk_size, self.offset)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOVERFLOW) or self.offset < _FAR:
                self._finish(NotFound(f"log of job {self._job.id} became unreadable: "
                                      f"{e.strerror}"))
                return False
            data = b""  # an offset past any file's end: nothing there, as past EOF
        if data:
            self.offset += len(data)
            self._call.send_chunk(data)
            return True
        if not self._follow or self._ended:
            self._finish(None)
        return False

    def _finish(self, error: Exception | None) -> None:
        self._close()
        if error is not None:
            self._done.errback(error)
        else:
            self._done.callback(self.offset)

    def _release(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._ended_d is not None:
            self._ended_d.cancel()
            self._ended_d = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
