"""Spare job log directories, made ahead of time in a worker thread, so that starting a job
renames one instead of making a directory and two files on the reactor thread."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from jobworker.jobs.logs import LogStore

#: Runs ``f(*args)`` off the reactor thread; the Deferred fires on the reactor thread.
ThreadRunner = Callable[..., "Deferred[Any]"]
#: What a refill task returns: spares made, whether it swept, the error that stopped it,
#: and the worker's CPU seconds per spare.
_Batch = tuple[list["Spare"], bool, "OSError | None", float]

#: Spares kept ready by default: ~30 ms of starts at full speed, 64 descriptors.
SIZE = 32
#: Spares made per task: a refill costs the reactor one wake-up per batch, and each batch
#: goes into a group directory of its own.
BATCH = 16


class Spare:
    """A ready spare: its group, its directory and its two files, open for appending."""

    __slots__ = ("group", "dir", "out", "err")

    def __init__(self, group: str, dir: str, out: int, err: int) -> None:
        self.group = group
        self.dir = dir
        self.out = out
        self.err = err

    def close(self) -> None:
        os.close(self.out)
        os.close(self.err)


class LogDirPool(service.Service):
    """Keeps up to ``size`` spare log directories ready for ``JobManager.start``.

    Why: making a directory and two files costs ~30 us on a quiet disk, but 0.4-0.7 ms on
    this ext4 (no journal) after anything deleted many files, because the inode allocator
    then skips every inode freed in the last minutes; on the reactor thread that is most
    of a start.  A worker thread pays it instead, and a start only renames a spare.

    When fewer than ``low_water`` are ready, one refill task (never two) makes spares in
    batches of ``batch`` until ``size`` are ready.  An empty pool is no error: ``take``
    returns None and the caller makes the directory itself, as it would without a pool.
    On start, leftovers of a daemon that did not stop cleanly are swept first; on stop,
    refilling stops, the spares' descriptors are closed and their directories removed.

    A worker thread is not free: each of its system calls hands the GIL back and forth
    with the reactor thread, which costs more than the ~30 us it saves when making files
    is cheap (measured: 1-client start rate 0.41 -> 0.38 of the bare spawn loop, 4 clients
    -12%, on a fresh file system).  So the pool refills continuously only while making a
    spare costs at least ``busy_cost`` of the worker's CPU time; below that it makes one
    batch per ``probe_interval`` (to notice when the disk turns slow) and starts that find
    it empty make their own directory, as cheap then as a rename.

    Each batch goes into a group directory (``.spare/<group>/<n>``) none of whose spares
    is ready any more: a rename locks the directory it moves a spare out of, and making a
    directory in it would hold that lock for as long as the inode allocation takes.  Spares
    are taken oldest first, so groups empty in turn and are reused (never deleted: a
    deleted inode is one more for the allocator to skip).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: LogStore,
        *,
        size: int = SIZE,
        low_water: int = SIZE // 2,
        batch: int = BATCH,
        retry_after: float = 5.0,
        busy_cost: float = 150e-6,
        probe_interval: float = 1.0,
        run_in_thread: ThreadRunner | None = None,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        if not 0 < low_water <= size or batch < 1:
            raise ValueError("need 0 < low_water <= size and batch >= 1")
        self._reactor = reactor
        self._store = store
        self._size = size
        self._low_water = low_water
        self._batch = batch
        self._retry_after = retry_after
        self._busy_cost = busy_cost
        self._probe_interval = probe_interval
        self._run_in_thread = run_in_thread
        self._cpu_clock = cpu_clock
        self._spares: deque[Spare] = deque()
        self._ready_in: dict[str, int] = {}  # group -> spares ready in it
        self._next_name = 0
        self._swept = False
        self._refill: Deferred[None] | None = None
        # No refill before this fires: after an error, or while spares are cheap to make.
        self._retry: DelayedCall | None = None

    @property
    def ready(self) -> int:
        """How many spares are ready now."""
        return len(self._spares)

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        # On the reactor thread, before the first worker thread makes a file.
        self._store.read_umask()
        self._store.prepare()
        super().startService()
        self._maybe_refill()

    def stopService(self) -> Deferred[None]:
        """Stop refilling; once a refill under way has finished, close every spare's
        descriptors and remove the spare directories."""
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        d: Deferred[None] = Deferred()
        in_flight = self._refill if self._refill is not None else succeed(None)
        in_flight.addBoth(lambda _: self._discard_all()).chainDeferred(d)
        return d

    # -- the start path ----------------------------------------------------------------

    def take(self, log_dir: str) -> tuple[int, int] | None:
        """Rename a spare to ``log_dir`` (from ``LogStore.dir_for``) and return its
        (stdout, stderr) descriptors, which the caller now owns; None when no spare is
        ready (or the rename failed): the caller then makes the directory itself."""
        if not self._spares:
            self._maybe_refill()
            return None
        spare = self._spares.popleft()
        self._ready_in[spare.group] -= 1
        try:
            self._store.adopt_spare(spare.dir, log_dir)
        except OSError as e:
            spare.close()
            self.log.warn(  # noqa: G010 (twisted.logger has no warning())
                "{event} spare={spare} log_dir={log_dir}: {error}",
                event="logs.spare_lost", spare=spare.dir, log_dir=log_dir,
                error=e.strerror or str(e),
            )
            self._maybe_refill()
            return None
        self._maybe_refill()
        return spare.out, spare.err

    # -- refilling -----------------------------------------------------------------------

    def _maybe_refill(self, keep_going: bool = False) -> None:
        """Start a refill task if none is running and the pool is below its low-water mark
        (or, when one batch has just landed, still below ``size``)."""
        if not self.running or self._refill is not None or self._retry is not None:
            return
        mark = self._size if keep_going else self._low_water
        if len(self._spares) >= mark:
            return
        count = min(self._batch, self._size - len(self._spares))
        names = [str(self._next_name + i) for i in range(count)]
        self._next_name += count
        group = next((g for g, n in self._ready_in.items() if n == 0), None)
        if group is None:
            group = str(len(self._ready_in))
            self._ready_in[group] = 0
        sweep = not self._swept
        d = self._in_thread(self._make, group, names, sweep)
        self._refill = d.addCallback(self._made).addErrback(self._bug)

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._run_in_thread is not None:
            return self._run_in_thread(f, *args)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _make(self, group: str, names: list[str], sweep: bool) -> _Batch:
        """In the worker thread: sweep leftovers first if asked, then make the spares.
        Returns what was made even when an error stopped it part way, and the thread's
        CPU time per spare (the kernel's inode search is CPU time; waiting for the GIL
        is not)."""
        made: list[Spare] = []
        make_spare = self._store.make_spare
        error: OSError | None = None
        try:
            if sweep:
                self._store.sweep_spares()
            began = self._cpu_clock()
            for name in names:
                made.append(Spare(group, *make_spare(group, name)))
        except OSError as e:
            error = e
        cost = (self._cpu_clock() - began) / len(made) if made else 0.0
        return made, sweep, error, cost

    def _made(self, result: _Batch) -> None:
        """Back on the reactor thread with a batch."""
        self._refill = None
        made, swept, error, cost = result
        self._swept = self._swept or swept
        if not self.running:
            for spare in made:
                spare.close()
            return
        self._spares.extend(made)
        for spare in made:
            self._ready_in[spare.group] += 1
        if error is not None:
            self.log.error(
                "{event} root={root}: {error}; retrying in {retry}s",
                event="logs.spares_failed", root=self._store.root,
                error=error.strerror or str(error), retry=self._retry_after,
            )
            self._retry_later()
            return
        if cost < self._busy_cost:
            # Cheap: starts can make their own; look again in a while.
            self._retry = self._reactor.callLater(self._probe_interval, self._retry_now)
            return
        self._maybe_refill(keep_going=True)

    def _bug(self, failure: Failure) -> None:
        """Not an OSError: a bug.  Keep the traceback; starts go on without spares."""
        self._refill = None
        self.log.failure("{event}", failure, event="logs.spares_bug")
        self._retry_later()

    def _retry_later(self) -> None:
        if self.running:
            self._retry = self._reactor.callLater(self._retry_after, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._maybe_refill(keep_going=True)

    def _discard_all(self) -> None:
        spares, self._spares = self._spares, deque()
        self._ready_in = {}
        self._swept = True  # by the sweep below: a later start need not sweep again
        for spare in spares:
            spare.close()
        self._store.sweep_spares()


__all__ = ["BATCH", "SIZE", "LogDirPool", "Spare", "ThreadRunner"]
