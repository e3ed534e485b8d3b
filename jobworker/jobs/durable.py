"""The durable job table: running jobs in memory, every job in SQLite (``jobworker.jobs.sql``).

Writes go to one writer thread, in batches: every job changed during a reactor turn (and
while the previous batch was being written) is written in one transaction, as its latest
record.  ``pending()`` is the barrier the RPC server awaits before a reply, so a client is
never told of a job, or of a change to it, that is not yet committed.  Reads (a job by id
or pid, a page of ``list``) run on the reactor thread on a connection of their own: in WAL
mode they never wait for the writer, and each is one indexed query (measured: ~20 us for a
job by id, ~0.6 ms for a page of 100, with 100,000 jobs in the table).

An ended job stays in memory until its final record is committed, and is then read back
from the table when asked for (``StoredJob``): the daemon's memory holds its running jobs,
not its history.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from jobworker.jobs import sql
from jobworker.jobs.job import Job
from jobworker.jobs.store import ListQuery, Page
from jobworker.jobs.stored import StoredJob
from jobworker.wire.codec import Encoded, decode
from jobworker.wire.errors import NotFound
from jobworker.wire.record import QUEUED, RUNNING

#: Runs ``f(*args)`` in the writer thread; the Deferred fires on the reactor thread.
Runner = Callable[..., "Deferred[Any]"]

#: Seconds a change that no reply waits for (a job's pid) may wait for the next batch.
LAZY = 0.02
#: Seconds before a failed write (a full or read-only disk) is tried again.
RETRY_AFTER = 1.0
#: Space kept for the table beside it (``jobs.db.reserve``), given up when the disk is
#: full so the ends and stops of running jobs are still recorded; new starts are refused
#: until it can be made again.  Thousands of updates fit in it.
RESERVE_BYTES = 2 * 1024 * 1024


def make_reserve(path: str, size: int = RESERVE_BYTES) -> bool:
    """Make (or keep) the reserve file at ``path``; False if there is no room for it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except OSError:
        os.ftruncate(fd, 0)
        return False
    finally:
        os.close(fd)


def _write(conn: sqlite3.Connection, rows: list[sql.Row], reserve: str | None) -> bool:
    """In the writer thread: commit ``rows``; then, if asked, make the reserve again."""
    sql.write(conn, rows)
    return reserve is None or make_reserve(reserve)


def _expire(conn: sqlite3.Connection, before: float | None, keep: int | None,
            spared: frozenset[str], batch: int) -> list[tuple[str, str | None]]:
    """In the writer thread: delete up to ``batch`` ended jobs that ended before
    ``before`` or lie past the newest ``keep``, but none in ``spared``; (id, log_dir) of
    each one deleted."""
    victims: dict[str, bytes] = {}
    if before is not None:
        victims.update(sql.ended_before(conn, before, batch))
    if keep is not None:
        victims.update(sql.ended_beyond(conn, keep, batch + len(spared)))
    gone = [(job_id, decode(packed)["log_dir"]) for job_id, packed in victims.items()
            if job_id not in spared][:batch]
    sql.delete(conn, [job_id for job_id, _ in gone])
    return gone


def _disk_full(failure: Failure) -> bool:
    error = failure.value
    return (isinstance(error, sqlite3.OperationalError) and "full" in str(error)) or (
        isinstance(error, OSError) and error.errno == errno.ENOSPC)


def row_of(job: Job) -> sql.Row:
    """The table row of ``job`` as it is now."""
    ticks = job.spawn_ticks
    request = job.request
    return sql.Row(
        job.id, job.owner, job.state, job.pid,
        ticks[0] if ticks is not None else None, ticks[1] if ticks is not None else None,
        job.started, job.ended_time,
        request[0] if request is not None else None,
        request[1] if request is not None else None,
        bytes(job.packed()),
        job.launch_spec,
        job.name,
        labels_column(job.labels),
    )


def labels_column(labels: dict[str, str] | None) -> str | None:
    """Labels as the table keeps them for ``list``'s filter: ``\\nkey=value\\n...``."""
    if not labels:
        return None
    return "\n" + "".join(f"{k}={v}\n" for k, v in labels.items())


class DurableStore:
    """The job table in ``path`` (SQLite, WAL mode), behind the ``JobStore`` seam."""

    log = Logger()

    def __init__(self, reactor: Any, path: str, *, fsync: bool = False,
                 run_in_writer: Runner | None = None) -> None:
        self._reactor = reactor
        self.path = path
        self._fsync = fsync
        self._run_in_writer = run_in_writer
        self._pool: ThreadPool | None = None
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        # In memory: running jobs, and ended ones until their final record is committed.
        self._live: dict[str, Job] = {}
        self._running_by_pid: dict[int, Job] = {}
        self._newest_by_pid: dict[int, Job] = {}
        self._requests: dict[tuple[str, str], Job] = {}
        # Jobs changed since the last batch was handed to the writer, in change order.
        self._dirty: dict[str, Job] = {}
        # Those of them whose change a reply must not report before it is committed.
        self._urgent: set[str] = set()
        self._writing_urgent = False
        self._flush_call: Any = None
        self._writing = False
        self._batch_waiters: list[Deferred[None]] = []  # the batch being written
        self._next_waiters: list[Deferred[None]] = []   # the batch after it
        #: Batches that could not be written (each retried until one succeeds).
        self.failures = 0
        self.reserve_path = path + ".reserve"
        #: Why new starts are refused, while the reserve is given up.
        self.short: str | None = None
        self.closed = False

    # -- life cycle -------------------------------------------------------------------

    def check(self) -> None:
        """Open, migrate and close the table: in ``makeService``, so a table that cannot
        be used stops the daemon with one line before it forks (a connection must not
        cross a fork: ``open`` makes the ones used)."""
        conn = sql.connect(self.path, fsync=self._fsync)
        try:
            sql.migrate(conn, self.path)
        finally:
            conn.close()

    def open(self) -> list[sql.Unfinished]:
        """Open (making or migrating) the table; the jobs it says were running, for the
        caller to reconcile with the machine.  Raises L{sql.TableError}."""
        self._reader = sql.connect(self.path, fsync=self._fsync)
        found = sql.migrate(self._reader, self.path)
        if found != sql.VERSION:
            self.log.info("{event} path={path} from={found} to={to}", event="table.migrated",
                          path=self.path, found=found, to=sql.VERSION)
        if self._run_in_writer is None:
            self._writer = sql.connect(self.path, fsync=self._fsync, check_same_thread=False)
            self._pool = ThreadPool(1, 1, name="jobworker-table")
            self._pool.start()
        else:
            self._writer = self._reader
        if not make_reserve(self.reserve_path):
            self._short_of_space()
        return sql.unfinished(self._reader)

    def _short_of_space(self) -> None:
        self.short = ("the state file system is full: the job table's reserve is in use, "
                      "so new jobs are refused until space is freed")

    def record_lost(self, rows: list[sql.Row]) -> None:
        """At start-up, before any reply: committed at once, on the reactor thread."""
        sql.write(self._reading(), rows)

    def close(self) -> Deferred[None]:
        """Write what is left, then close; fires once done."""
        d = self.pending()
        done: Deferred[None] = Deferred()

        def closed(_: object) -> None:
            self.closed = True
            if self._pool is not None:
                self._pool.stop()
                self._pool = None
            if self._writer is not None and self._writer is not self._reader:
                self._writer.close()
            if self._reader is not None:
                self._reader.close()
            self._writer = self._reader = None
            done.callback(None)

        if d is None:
            closed(None)
        else:
            d.addBoth(closed)
        return done

    # -- changes ----------------------------------------------------------------------

    def add(self, job: Job) -> None:
        self._live[job.id] = job
        if job.request is not None:
            self._requests[job.owner, job.request[0]] = job
        self._changed(job)

    def queued(self) -> list[sql.Queued]:
        """At start-up: the jobs the table says are queued, oldest first."""
        return sql.queued(self._reading())

    def requeue(self, job: Job) -> None:
        """A queued job of an earlier daemon, rebuilt (already in the table)."""
        self._live[job.id] = job

    def changed(self, job: Job) -> None:
        """``job`` left the queue: committed before its program runs, so no restart can
        run it a second time (one found running without a pid is looked for by its id)."""
        self._changed(job)

    def adopt(self, job: Job) -> None:
        """A running job of an earlier daemon, taken over (already in the table)."""
        self._live[job.id] = job
        self.running(job)

    def running(self, job: Job) -> None:
        """Written with the next batch, but no reply waits for it: the job's row is
        committed already (``add``), and a daemon killed before its pid is written finds
        the job by its id (``recovery``), so the start's reply need not wait twice."""
        if job.pid is not None:
            self._running_by_pid[job.pid] = job
            self._newest_by_pid[job.pid] = job
        self._changed(job, urgent=False)

    def ended(self, job: Job) -> None:
        if job.pid is not None:
            if self._running_by_pid.get(job.pid) is job:
                del self._running_by_pid[job.pid]
            self._newest_by_pid.setdefault(job.pid, job)
        self._changed(job)

    def _changed(self, job: Job, urgent: bool = True) -> None:
        self._dirty[job.id] = job
        if urgent:
            self._urgent.add(job.id)
            call = self._flush_call
            if call is not None and call.getTime() > self._reactor.seconds():
                call.reset(0)  # a lazy flush was waiting: this change is urgent
        elif not self._urgent:
            self._flush_later()
            return
        if not self._writing and self._flush_call is None:
            # Everything changed in this reactor turn goes in one batch.
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush_later(self) -> None:
        """Only changes no reply waits for (a pid): written within LAZY, or sooner with
        the next batch a reply does wait for (a short job's end, a queued job leaving
        the queue), so a slot freeing does not wait behind a commit of pids."""
        if not self._writing and self._flush_call is None:
            self._flush_call = self._reactor.callLater(LAZY, self._flush)

    # -- the writer ---------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_call = None
        if self._writing or not self._dirty or self.closed:
            return
        jobs = list(self._dirty.values())
        self._dirty.clear()
        self._writing_urgent = bool(self._urgent)
        self._urgent.clear()
        rows = [row_of(job) for job in jobs]
        ended = [job for job, row in zip(jobs, rows, strict=True) if row.ended is not None]
        self._writing = True
        self._batch_waiters, self._next_waiters = self._next_waiters, []
        d = self._run(_write, self._writer, rows,
                      self.reserve_path if self.short is not None else None)
        d.addBoth(self._written, jobs, ended)

    def _run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._run_in_writer is not None:
            return self._run_in_writer(f, *args)
        assert self._pool is not None
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _written(self, result: object, jobs: list[Job], ended: list[Job]) -> None:
        self._writing = False
        if isinstance(result, Failure):
            # A full or failing disk: say so loudly, keep the jobs in memory (they are
            # still served from there) and try again; the replies waiting on this batch go
            # out, telling the truth about the jobs, even though it is not yet durable.
            self.failures += 1
            retry = RETRY_AFTER
            if _disk_full(result):
                retry = self._give_up_reserve(result)
            else:
                self.log.failure("{event} path={path} jobs={count}", result,
                                 event="table.write_failed", path=self.path, count=len(jobs))
            for job in jobs:
                self._dirty.setdefault(job.id, job)
            if self._flush_call is None:
                self._flush_call = self._reactor.callLater(retry, self._flush)
        else:
            if result is True and self.short is not None:
                self.short = None
                self.log.info("{event} path={path}", event="table.reserve_restored",
                              path=self.reserve_path)
            for job in ended:
                if job.id not in self._dirty:
                    self._forget_live(job)
            if self._dirty and self._flush_call is None:
                self._flush_call = self._reactor.callLater(0 if self._urgent else LAZY,
                                                           self._flush)
        waiters, self._batch_waiters = self._batch_waiters, []
        for d in waiters:
            if not d.called:  # a waiter cancelled meanwhile (its caller went away)
                d.callback(None)

    def _give_up_reserve(self, failure: Failure) -> float:
        """The disk is full: free the reserve so this batch fits, and refuse new starts;
        how long to wait before writing again (at once, if there was a reserve)."""
        self._short_of_space()
        try:
            os.unlink(self.reserve_path)
        except FileNotFoundError:
            self.log.error("{event} path={path}: {error}", event="table.write_failed",
                           path=self.path, error=failure.getErrorMessage())
            return RETRY_AFTER
        except OSError as e:
            self.log.error("{event} path={path}: {error}", event="table.write_failed",
                           path=self.path, error=e)
            return RETRY_AFTER
        self.log.error("{event} path={path}: {error}; the reserve was freed and new jobs "
                       "are refused until the disk has room", event="table.reserve_used",
                       path=self.reserve_path, error=failure.getErrorMessage())
        return 0.0

    def expire(self, before: float | None, keep: int | None, spared: frozenset[str],
               batch: int = 1000) -> Deferred[list[tuple[str, str | None]]]:
        """Delete ended jobs past ``--retention`` (ended before ``before``) or
        ``--max-history`` (past the newest ``keep``), except ``spared``; fires with the
        (id, log_dir) of each, at most ``batch``."""
        return self._run(_expire, self._writer, before, keep, spared, batch)

    def forget(self, job_id: str) -> Deferred[None]:
        """Delete one ended job (committed already: the caller awaited ``pending``)."""
        return self._run(sql.delete, self._writer, [job_id])

    def _forget_live(self, job: Job) -> None:
        """``job``'s final record is in the table: serve it from there from now on."""
        if self._live.get(job.id) is job:
            del self._live[job.id]
        if job.pid is not None and self._newest_by_pid.get(job.pid) is job:
            del self._newest_by_pid[job.pid]
        if job.request is not None and self._requests.get((job.owner, job.request[0])) is job:
            del self._requests[job.owner, job.request[0]]

    def pending(self) -> Deferred[None] | None:
        if self._urgent:
            d: Deferred[None] = Deferred()
            self._next_waiters.append(d)
            return d
        if self._writing and self._writing_urgent:
            d = Deferred()
            self._batch_waiters.append(d)
            return d
        return None

    # -- reads ------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | StoredJob:
        job = self._live.get(job_id) if type(job_id) is str else None
        if job is not None:
            return job
        packed = sql.record_by_id(self._reading(), job_id) if type(job_id) is str else None
        if packed is None:
            raise NotFound(f"no such job: {job_id}")
        return StoredJob(packed)

    def by_pid(self, pid: int) -> Job | StoredJob:
        job = self._running_by_pid.get(pid) or self._newest_by_pid.get(pid)
        if job is not None:
            return job
        packed = sql.record_by_pid(self._reading(), pid)
        if packed is None:
            raise NotFound(f"no such job: {pid}")
        return StoredJob(packed)

    def by_request(self, owner: str, request_id: str) -> tuple[Any, bytes] | None:
        job = self._requests.get((owner, request_id))
        if job is not None and job.request is not None:
            return job, job.request[1]
        found = sql.by_request(self._reading(), owner, request_id)
        if found is None:
            return None
        packed, digest = found
        stored = StoredJob(packed)
        live = self._live.get(stored.id)
        return (live if live is not None else stored), digest

    def running_with_pid(self, pid: int) -> Job | None:
        return self._running_by_pid.get(pid)

    def ids_by_prefix(self, prefix: str, owner: str | None, limit: int) -> list[str]:
        # Jobs not yet written are in memory only; the table has every other.
        live = {job_id for job_id, job in self._live.items()
                if job_id.startswith(prefix) and owner in (None, job.owner)}
        stored = sql.ids_by_prefix(self._reading(), prefix, owner, limit)
        return sorted(live.union(stored))[:limit]

    def by_name(self, owner: str, name: str) -> Job | StoredJob:
        """The table's newest (the manager asks its live names first)."""
        packed = sql.record_by_name(self._reading(), owner, name)
        if packed is None:
            raise NotFound(f"no such job: {name}")
        stored = StoredJob(packed)
        live = self._live.get(stored.id)
        return live if live is not None else stored

    def running_jobs(self) -> list[Job]:
        return [job for job in reversed(self._live.values())
                if not job.ended and job.state != QUEUED]

    def newest_first(self) -> list[Any]:
        rows = sql.page(self._reading(), before=None, limit=-1)  # -1: no limit
        return [self._live.get(job_id) or StoredJob(packed)
                for _seq, job_id, _state, packed in rows]

    def page(self, query: ListQuery) -> Page:
        """Read from the table (the caller awaits ``pending()`` first, so it is current);
        a running job's record comes from memory, which is as fresh or fresher."""
        rows = sql.page(self._reading(), before=query.before, limit=query.limit + 1,
                        owner=query.owner, state=query.state, since=query.since,
                        until=query.until, name=query.name, labels=query.labels)
        more = len(rows) > query.limit
        rows = rows[:query.limit]
        records: list[Encoded] = []
        for _seq, job_id, state, packed in rows:
            live = self._live.get(job_id) if state in (RUNNING, QUEUED) else None
            records.append(live.packed() if live is not None else Encoded(packed))
        return Page(records, rows[-1][0] if more and rows else None)

    def _reading(self) -> sqlite3.Connection:
        if self._reader is None:
            raise NotFound("the job table is closed")
        return self._reader

