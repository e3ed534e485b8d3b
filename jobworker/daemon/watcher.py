"""Telling followers that a log file may have grown: inotify (one watch per file, shared by
every follower of it), or a bounded poll where inotify is unavailable."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import filepath

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
