"""Retention: ended jobs past ``--retention`` or beyond ``--max-history`` are removed, their
records from the table and their log folders from the disk, a batch at a time, never one a
follower is reading."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from jobworker.jobs.store import JobStore

#: Seconds between rounds; a round that filled its batch is followed by another at once.
INTERVAL = 60.0
BATCH = 1000


def remove_log_dirs(root: str, dirs: list[str | None]) -> int:
    """In a worker thread: remove each job log folder that lies under ``root``; how many.
    None: the job had none (it was cancelled in the queue)."""
    removed = 0
    prefix = os.path.join(os.path.realpath(root), "")
    for path in dirs:
        if path is None or not os.path.realpath(path).startswith(prefix):
            continue  # never anything outside the logs folder, whatever a row says
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


class Retention(service.Service):
    """Removes old ended jobs every ``interval`` seconds."""

    log = Logger()

    def __init__(self, reactor: Any, store: JobStore, log_root: str, *,
                 retention: float | None, max_history: int | None,
                 spared: Callable[[], frozenset[str]], interval: float = INTERVAL,
                 batch: int = BATCH) -> None:
        self._reactor = reactor
        self._store = store
        self._log_root = log_root
        self._retention = retention
        self._max_history = max_history
        self._spared = spared
        self._batch = batch
        self._loop = LoopingCall(self.round)
        self._loop.clock = reactor
        self._interval = interval
        self._running: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        if self._retention is not None or self._max_history is not None:
            self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._running

    def round(self) -> Deferred[None]:
        """One round, until a batch comes back short."""
        self._running = Deferred.fromCoroutine(self._round())
        return self._running

    async def _round(self) -> None:
        while True:
            before = (self._reactor.seconds() - self._retention
                      if self._retention is not None else None)
            try:
                gone = await self._store.expire(before, self._max_history, self._spared(),
                                                self._batch)
                removed = await deferToThreadPool(
                    self._reactor, self._reactor.getThreadPool(), remove_log_dirs,
                    self._log_root, [log_dir for _, log_dir in gone])
            except Exception:
                self.log.failure("{event}", event="retention.failed")
                return
            if gone:
                self.log.info("{event} jobs={jobs} log_dirs={dirs}", event="retention.removed",
                              jobs=len(gone), dirs=removed)
            if len(gone) < self._batch or not self.running:
                return
