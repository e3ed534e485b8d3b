"""Streaming a job's log to a client, from any offset, optionally following it live.

Each stream is a push producer behind its connection: while the connection's transport
is paused it reads nothing, so however slow a follower is, the daemon holds at most one
chunk for it.  New output wakes followers through inotify (one watch per file, shared
by every follower of it), or through a bounded poll where inotify is unavailable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import filepath

from jobworker.errors import NotFound

if TYPE_CHECKING:
    from jobworker.jobs import Job
    from jobworker.server import Call

CHUNK_SIZE = 256 * 1024
POLL_INTERVAL = 0.05


class FileWatcher:
    """Calls back when a file may have grown: inotify where it works, else a poll."""

    log = Logger()

    def __init__(self, reactor: Any, use_inotify: bool = True,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self._reactor = reactor
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._poll_interval = poll_interval
        self._notifier: Any = None
        self._poller: LoopingCall | None = None
        if use_inotify:
            try:
                from twisted.internet import inotify

                notifier = inotify.INotify(reactor)
                notifier.startReading()
                self._notifier = notifier
                self._mask = inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE
            except Exception as e:  # no inotify here: fall back to polling
                self.log.info("follow.poll_fallback reason={reason}", reason=str(e))

    @property
    def mode(self) -> str:
        return "inotify" if self._notifier is not None else "poll"

    def watch(self, path: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Start calling ``callback`` on growth of ``path``; returns the way to stop."""
        callbacks = self._watchers.setdefault(path, set())
        if not callbacks:
            self._add(path)
        callbacks.add(callback)

        def unwatch() -> None:
            cbs = self._watchers.get(path)
            if cbs is None or callback not in cbs:
                return
            cbs.discard(callback)
            if not cbs:
                del self._watchers[path]
                self._remove(path)

        return unwatch

    def _add(self, path: str) -> None:
        if self._notifier is not None:
            try:
                self._notifier.watch(filepath.FilePath(path), mask=self._mask,
                                     callbacks=[self._inotify_event])
                return
            except Exception as e:
                self.log.warn("follow.watch_failed path={path} reason={reason}",
                              path=path, reason=str(e))
        if self._poller is None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self._reactor
            self._poller.start(self._poll_interval, now=False)

    def _remove(self, path: str) -> None:
        if self._notifier is not None:
            try:
                self._notifier.ignore(filepath.FilePath(path))
            except KeyError:
                pass
        if not self._watchers and self._poller is not None:
            self._poller.stop()
            self._poller = None

    def _inotify_event(self, ignored: Any, path: filepath.FilePath, mask: int) -> None:
        self._fire(path.path if isinstance(path.path, str) else os.fsdecode(path.path))

    def _poll(self) -> None:
        for path in list(self._watchers):
            self._fire(path)

    def _fire(self, path: str) -> None:
        for callback in list(self._watchers.get(path, ())):
            callback()

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None


class LogStream:
    """Sends one log file from ``offset`` as chunk frames, then finishes.

    Without ``follow`` it ends at the file's current end; with ``follow`` it ends once
    the job has ended and every byte up to the end of the file has been sent.
    """

    log = Logger()

    def __init__(self, call: Call, job: Job, path: str, offset: int, follow: bool,
                 watcher: FileWatcher, chunk_size: int = CHUNK_SIZE) -> None:
        self._call = call
        self._job = job
        self._path = path
        self.offset = offset
        self._follow = follow
        self._watcher = watcher
        self._chunk_size = chunk_size
        self._fd = -1
        self._paused = False
        self._pumping = False
        self._ended = False
        self._closed = False
        self._unwatch: Callable[[], None] | None = None
        self._ended_d: Deferred[Any] | None = None
        self._done: Deferred[int] = Deferred(lambda _: self._close())

    def start(self) -> Deferred[int]:
        """Begin sending; the Deferred fires with the final offset."""
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NotFound(f"log of job {self._job.id} is unavailable: {e.strerror}") from None
        self._call.protocol.add_producer(self)
        if self._follow:
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

    def _pump(self) -> None:
        if self._pumping or self._closed:
            return
        self._pumping = True
        try:
            while not self._paused and not self._closed:
                try:
                    data = os.pread(self._fd, self._chunk_size, self.offset)
                except OSError as e:
                    self._finish(NotFound(f"log of job {self._job.id} became unreadable: "
                                          f"{e.strerror}"))
                    return
                if data:
                    self.offset += len(data)
                    self._call.send_chunk(data)
                    # The connection passes on only its first pause: if another stream on
                    # it filled the transport before we were resumed, this chunk was our
                    # share, and we wait for the next resume like the others.
                    if self._call.protocol.paused:
                        self._paused = True
                    continue
                if not self._follow or self._ended:
                    self._finish(None)
                return
        finally:
            self._pumping = False

    def _finish(self, error: Exception | None) -> None:
        self._close()
        if error is not None:
            self._done.errback(error)
        else:
            self._done.callback(self.offset)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._ended_d is not None:
            self._ended_d.cancel()
            self._ended_d = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._call.protocol.remove_producer(self)

    # IPushProducer, driven by the connection.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._close()
