"""Job cgroups made ahead of time (in a worker thread), so that a start only moves the
reactor thread in and out instead of making six cgroups there; recycled or removed after
the job (on the reactor thread, a few per turn); and the start-up report of what isolation
this daemon has."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from jobworker.jobs.cgroups import CgroupDriver, CgroupFiles, Kill
from jobworker.jobs.jobcgroup import JobCgroup

#: Runs ``f(*args)`` off the reactor thread; the Deferred fires on the reactor thread.
ThreadRunner = Callable[..., "Deferred[Any]"]

#: Cgroups kept ready.  On this host (v1, four hierarchies for every job) making one job's
#: cgroups and opening their files costs ~150 us of wall time: done in a worker thread,
#: BATCH at a time, for cgroups named by job ids not yet given out.
SIZE = 16
BATCH = 8
#: Recycled or removed per reactor turn, at most.  A job's end is handled on the reactor
#: thread: recycling a v1 cgroup costs ~200 us (a new memory cgroup, two counters reset,
#: three renames: kernfs calls, no disk I/O), removing one ~130 us, and the same work
#: handed to a thread for each job cost the daemon ~700 us more CPU per job than it saved
#: (the hand-offs, and the two threads taking the GIL from each other at every system
#: call: ``bench/cgroups.py``).  So a burst of ends costs a turn ~2 ms at most.
PER_TURN = 8
#: A cgroup still busy when removed (its last task not yet detached) is tried again.
RETRY_AFTER = 1.0
RETRIES = 5
#: At stop, how long to wait for jobs still holding a cgroup (their manager is stopping
#: them: it stops at the same time, as MultiService stops every child at once).
DRAIN_WAIT = 30.0


#: Ids given out by ``new_id`` and not yet taken, at most (the oldest then go).
MAX_GIVEN = 4096


class CgroupPool(service.Service):
    """Hands each starting job its own cgroup (``take``) and recycles or removes it once
    the job has ended (``JobCgroup.release`` -> ``_released``).

    Job cgroups are named by job id, and a cgroup can be renamed only on v1 (and a rename
    costs about half a mkdir), so the pool makes cgroups for ids not given out yet: up to
    ``size`` are kept ready, their ``tasks`` files already open, and ``new_id`` gives out
    the id of one (``JobManager.new_id``).  ``take`` for an id without a ready cgroup makes
    one on the spot.  Disabled (``driver`` None, or the subtree cannot be made): ``new_id``
    and ``take`` return None and jobs run without cgroups, as before.

    On start the subtree is made and every empty cgroup left in it by an earlier daemon is
    removed (non-empty ones are kept and logged: a job of that daemon still runs there); on
    stop the ready cgroups and any left empty are removed, then the subtree if empty."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        driver: CgroupDriver | None,
        reason: str = "",
        *,
        size: int = SIZE,
        batch: int = BATCH,
        run_in_thread: ThreadRunner | None = None,
        kill: Kill = os.kill,
    ) -> None:
        self._reactor = reactor
        self.driver = driver
        self._reason = reason
        self._size = size
        self._batch = batch
        self._run_in_thread = run_in_thread
        self._kill = kill
        self._spares: dict[str, CgroupFiles] = {}  # made, id not given out (oldest first)
        self._given: dict[str, CgroupFiles] = {}  # id given out by new_id, not taken yet
        self._refill: Deferred[None] | None = None
        self._doomed: list[_Doomed] = []  # to recycle or remove, PER_TURN at a time
        self._remove_call: DelayedCall | None = None
        self._busy: list[_Doomed] = []  # not empty yet: tried again after RETRY_AFTER
        self._busy_call: DelayedCall | None = None
        self._ready = False
        # Cgroups handed to jobs and not released yet; at stop they are waited for.
        self._out: set[str] = set()
        self._drained: list[Deferred[None]] = []
        # Removal goes on while stopping, until the last batch at teardown.
        self._serving = False
        # The start-up sweep of an earlier daemon's leftovers is running; ``prepare``
        # calls made meanwhile wait for it.
        self._sweeping = False
        self._after_sweep: list[Deferred[None]] = []

    @property
    def enabled(self) -> bool:
        return self.driver is not None and self._ready

    @property
    def ready(self) -> int:
        """Spares ready now."""
        return len(self._spares)

    def paths(self, job_id: str) -> list[str]:
        """Where job ``job_id``'s cgroup is (or was), one directory per hierarchy: how a
        restarted daemon finds a job's processes from its id (read ``cgroup.procs``; v1:
        freeze, SIGKILL each, thaw; v2: write 1 to ``cgroup.kill``).  [] if disabled."""
        return self.driver.paths(job_id) if self.driver is not None else []

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        driver = self.driver
        if driver is None:
            self.log.info("{event}: jobs run without cgroups ({reason}); stop signals the "
                          "process group only", event="cgroups.disabled", reason=self._reason)
            return
        try:
            driver.setup()
        except OSError as e:
            self.log.error(
                "{event}: cannot make the job subtree {roots}: {error}; jobs run without "
                "cgroups", event="cgroups.unavailable", roots=list(driver.roots),
                error=e.strerror or str(e))
            self.driver = None
            return
        self._ready = True
        self._serving = True
        self.log.info("{event} version={version} controllers={controllers} roots={roots}",
                      event="cgroups.enabled", version=driver.version,
                      controllers=",".join(driver.controllers), roots=list(driver.roots))
        # Set before the callbacks are added: a runner that calls at once (tests) has
        # them run here, and they clear it.
        self._sweeping = True
        self._refill = d = self._in_thread(self._sweep, driver)
        d.addCallback(self._swept).addErrback(self._bug, "_refill").addBoth(
            self._sweep_done)

    def stopService(self) -> Deferred[None]:
        """Once every job has handed its cgroup back (the job manager is stopping them
        meanwhile; DRAIN_WAIT at most), remove what is left and the subtree."""
        super().stopService()
        if self.driver is None or not self._ready:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        if self._out:
            self._drained.append(drained)
            timer = self._reactor.callLater(DRAIN_WAIT, self._drain_timeout)
            drained.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        else:
            drained.callback(None)
        d: Deferred[None] = Deferred()
        drained.addCallback(lambda _: self._last_batch(d))
        return d

    def _drain_timeout(self) -> None:
        self.log.error("{event} cgroups={names}", event="cgroups.still_held",
                       names=sorted(self._out))
        waiters, self._drained = self._drained, []
        for w in waiters:
            w.callback(None)

    def _last_batch(self, d: Deferred[None]) -> None:
        for call in (self._remove_call, self._busy_call):
            if call is not None and call.active():
                call.cancel()
        self._remove_call = self._busy_call = None
        in_flight = [self._refill] if self._refill is not None else []

        def last(_: object = None) -> None:
            if in_flight:
                in_flight.pop().addBoth(last)
                return
            unused = {**self._spares, **self._given}
            self._spares, self._given = {}, {}
            batch = ([_Doomed(n, f, 1) for n, f in unused.items()] + self._doomed
                     + self._busy)
            self._doomed, self._busy = [], []
            self._serving = False
            self._in_thread(self._teardown, batch).addCallback(self._removed).addErrback(
                self._bug).chainDeferred(d)

        last()

    # -- the start path ----------------------------------------------------------------

    def new_id(self) -> str | None:
        """A fresh job id (a UUID) whose cgroup is ready; None if none is ready (or
        cgroups are off): the caller makes its own id then."""
        if not self._spares:
            self._maybe_refill()
            return None
        job_id = next(iter(self._spares))
        self._given[job_id] = self._spares.pop(job_id)
        if len(self._given) > MAX_GIVEN:
            # Ids given out for starts that were then refused: their cgroups go.  Bounded
            # far above the starts that can be between new_id and take at once (each
            # waits there for its job's commit): an id still to be taken must not go.
            stale = next(iter(self._given))
            self._doom(_Doomed(stale, self._given.pop(stale), RETRIES))
        self._maybe_refill()
        return job_id

    def prepare(self, job_id: str) -> Deferred[None]:
        """Make job ``job_id``'s cgroup now, in the worker thread, for a ``take`` soon
        (a job leaving the queue: its id was chosen long before).  Never fails: a
        cgroup that could not be made is made, or its error raised, by ``take``."""
        driver = self.driver
        if driver is None or not self._ready or job_id in self._given:
            return succeed(None)
        if self._sweeping:
            # The start-up sweep removes every empty cgroup of the subtree: one made
            # meanwhile would go with them.  Made once it is done.
            after: Deferred[None] = Deferred()
            self._after_sweep.append(after)
            return after.addCallback(lambda _: self.prepare(job_id))

        def made(result: tuple[list[tuple[str, CgroupFiles]], OSError | None]) -> None:
            for name, files in result[0]:
                if self.running:
                    self._given[name] = files
                else:
                    self._doomed.append(_Doomed(name, files, 1))

        return self._in_thread(self._make, driver, [job_id]).addCallback(made).addErrback(
            lambda f: self.log.failure("{event}", f, event="cgroups.bug"))

    def take(self, job_id: str) -> JobCgroup | None:
        """Job ``job_id``'s own cgroup, ready to ``enter``: the one made for an id from
        ``new_id``, or one made now.  None when disabled; OSError when the cgroup cannot
        be made."""
        driver = self.driver
        if driver is None or not self._ready:
            return None
        files = self._given.pop(job_id, None)
        if files is None:
            driver.create(job_id)
            try:
                files = driver.open(job_id)
            except OSError:
                self._doom(_Doomed(job_id, None, RETRIES))
                raise
        self._out.add(job_id)
        return JobCgroup(self._reactor, files, atomic_kill=driver.atomic_kill,
                         on_release=self._released, kill=self._kill)

    def unused(self, job_id: str) -> None:
        """The id was given out, but its job ended without taking its cgroup (it failed
        to start): the cgroup goes now, not when MAX_GIVEN is reached."""
        files = self._given.pop(job_id, None)
        if files is not None:
            self._doom(_Doomed(job_id, files, RETRIES))

    def adopt(self, job_id: str) -> JobCgroup | None:
        """The cgroup an earlier daemon made for job ``job_id``, still holding its
        processes: how an adopted job is stopped whole.  None if disabled or gone."""
        driver = self.driver
        if driver is None or not self._ready:
            return None
        try:
            files = driver.open(job_id)
        except OSError:
            return None
        self._out.add(job_id)
        # Removed, not recycled, once released: the earlier daemon may have given it
        # cgroups in on-demand hierarchies (cpu, pids) that these files do not know of,
        # and a removal takes those too (``CgroupDriver.paths``).
        return JobCgroup(self._reactor, files, atomic_kill=driver.atomic_kill,
                         on_release=self._released_adopted, kill=self._kill)

    # -- spares ------------------------------------------------------------------------

    def _maybe_refill(self) -> None:
        if (not self.running or self._refill is not None or self.driver is None
                or not self._ready or len(self._spares) > self._size // 2):
            return
        count = min(self._batch, self._size - len(self._spares))
        if count <= 0:
            return
        names = [str(uuid.uuid4()) for _ in range(count)]
        self._refill = d = self._in_thread(self._make, self.driver, names)
        d.addCallback(self._made).addErrback(self._bug, "_refill")

    @staticmethod
    def _make(driver: CgroupDriver, names: list[str]
              ) -> tuple[list[tuple[str, CgroupFiles]], OSError | None]:
        """In the worker thread: make each cgroup and open its files."""
        made: list[tuple[str, CgroupFiles]] = []
        name = ""
        try:
            for name in names:
                driver.create(name)
                made.append((name, driver.open(name)))
        except OSError as e:
            try:
                driver.remove(name)
            except OSError:
                pass
            return made, e
        return made, None

    def _made(self, result: tuple[list[tuple[str, CgroupFiles]], OSError | None]) -> None:
        self._refill = None
        made, error = result
        if not self.running:
            self._doomed.extend(_Doomed(name, files, 1) for name, files in made)
            return
        self._spares.update(made)
        if error is not None:
            self.log.error("{event}: {error}", event="cgroups.spares_failed",
                           error=error.strerror or str(error))
            return  # starts make their own until a take finds the pool low again
        if len(self._spares) < self._size:
            self._maybe_refill()

    @staticmethod
    def _sweep(driver: CgroupDriver) -> tuple[list[str], list[str]]:
        """In the worker thread, at start: remove what an earlier daemon left in our
        subtree; (removed, kept because a process is still in it)."""
        removed, kept = [], []
        for name in driver.children():
            try:
                driver.remove(name)
                removed.append(name)
            except OSError:
                kept.append(name)
        return removed, kept

    def _sweep_done(self, _: object) -> None:
        self._sweeping = False
        waiting, self._after_sweep = self._after_sweep, []
        for d in waiting:
            d.callback(None)

    def _swept(self, result: tuple[list[str], list[str]]) -> None:
        self._refill = None
        removed, kept = result
        if removed or kept:
            self.log.info("{event} removed={removed} kept={kept}", event="cgroups.leftovers",
                          removed=len(removed), kept=kept)
        self._maybe_refill()

    # -- removal -------------------------------------------------------------------------

    def _released(self, files: CgroupFiles, reuse: bool = True) -> None:
        """From JobCgroup.release: the job is over, its cgroup empty and its final usage
        read; recycled or removed within a turn or two."""
        name = files.name  # before a recycle renames it
        self._out.discard(name)
        self._doom(_Doomed(name, files, RETRIES, reuse))
        if not self._out and self._drained:
            waiters, self._drained = self._drained, []
            for w in waiters:
                w.callback(None)

    def _released_adopted(self, files: CgroupFiles) -> None:
        self._released(files, reuse=False)

    def _doom(self, doomed: _Doomed) -> None:
        """Recycled or removed at the end of this reactor turn, with whatever else ended
        in it (PER_TURN at a time)."""
        self._doomed.append(doomed)
        if self._remove_call is None and self._serving:
            self._remove_call = self._reactor.callLater(0, self._remove_now)

    def _remove_now(self) -> None:
        self._remove_call = None
        if not self._doomed or self.driver is None:
            return
        batch, self._doomed = self._doomed[:PER_TURN], self._doomed[PER_TURN:]
        room = (self._size - len(self._spares) - (self._batch if self._refill else 0)
                if self.running else 0)
        try:
            self._removed(self._remove(self.driver, batch, max(room, 0)))
        except Exception:  # noqa: BLE001 (a bug: keep the traceback, go on with the rest)
            self.log.failure("{event}", event="cgroups.bug")
        if self._doomed and self._remove_call is None and self._serving:
            self._remove_call = self._reactor.callLater(0, self._remove_now)

    @staticmethod
    def _remove(driver: CgroupDriver, batch: list[_Doomed], recycle: int = 0
                ) -> list[_Doomed]:
        """Recycle each cgroup under a fresh id (up to ``recycle`` of them, where the
        kernel can) or close its files and remove it; returns the batch with what happened
        to each.  On the reactor thread, and at stop in the worker thread."""
        for doomed in batch:
            files = doomed.files
            if files is not None:
                if recycle > 0 and doomed.reuse:
                    fresh = str(uuid.uuid4())
                    try:
                        files.recycle(fresh)
                        doomed.recycled = files
                        recycle -= 1
                        doomed.error = None
                        continue
                    except OSError:
                        recycle = 0  # v2, or something odd: remove from now on
                        try:
                            driver.remove(fresh)  # what was renamed or made already
                        except OSError:
                            pass
                files.close()
                doomed.files = None
            try:
                driver.remove(doomed.name)
                doomed.error = None
            except OSError as e:
                doomed.error = e
        return batch

    def _removed(self, batch: list[_Doomed]) -> None:
        for doomed in batch:
            if doomed.recycled is not None:
                files, doomed.recycled = doomed.recycled, None
                if self.running:
                    self._spares[files.name] = files
                else:
                    self._doomed.append(_Doomed(files.name, files, 1))
            e = doomed.error
            if e is None:
                continue
            if e.errno == errno.EBUSY and doomed.tries > 1 and self._serving:
                doomed.tries -= 1
                self._busy.append(doomed)
            else:
                self.log.error("{event} cgroup={name}: {error}", event="cgroups.remove_failed",
                               name=doomed.name, error=e.strerror or str(e))
        if self._busy and self._busy_call is None and self._serving:
            self._busy_call = self._reactor.callLater(RETRY_AFTER, self._retry_busy)

    def _retry_busy(self) -> None:
        self._busy_call = None
        busy, self._busy = self._busy, []
        for doomed in busy:
            self._doom(doomed)

    def _teardown(self, batch: list[_Doomed]) -> list[_Doomed]:
        """In the worker thread, at stop: the last batch, then the subtree if empty."""
        assert self.driver is not None
        batch = self._remove(self.driver, batch)
        for doomed in batch:
            doomed.error = None  # left for a later daemon's start-up sweep
        self.driver.teardown()
        return batch

    # -- plumbing ------------------------------------------------------------------------

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._run_in_thread is not None:
            return self._run_in_thread(f, *args)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _bug(self, failure: Failure, task: str | None = None) -> None:
        """Not an OSError: a bug.  Keep the traceback; the task may run again."""
        if task is not None:
            setattr(self, task, None)
        self.log.failure("{event}", failure, event="cgroups.bug")


class _Doomed:
    """A cgroup to recycle or remove: its files if still open, how many more tries a busy
    cgroup gets, whether it may be recycled; then what became of it."""

    __slots__ = ("name", "files", "tries", "reuse", "error", "recycled")

    def __init__(self, name: str, files: CgroupFiles | None, tries: int,
                 reuse: bool = True) -> None:
        self.name = name
        self.files = files
        self.tries = tries
        self.reuse = reuse
        self.error: OSError | None = None
        self.recycled: CgroupFiles | None = None


__all__ = ["BATCH", "PER_TURN", "SIZE", "CgroupPool", "ThreadRunner"]
