"""Where jobs are kept: the seam between the job manager and its table.

``MemoryStore`` keeps every ``Job`` for the daemon's lifetime (``--store memory``);
``jobworker.jobs.durable.DurableStore`` keeps running jobs in memory and the whole table in
SQLite.  The manager and the ``list`` stream use only the methods of ``JobStore``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import Deferred, succeed

from jobworker.jobs.job import Job
from jobworker.jobs.sql import Queued, Row, Unfinished
from jobworker.wire.codec import Encoded
from jobworker.wire.errors import NotFound
from jobworker.wire.record import QUEUED


@dataclass(frozen=True)
class ListQuery:
    """One page of ``list``: newest first, at most ``limit`` jobs older than cursor
    ``before``, matching every filter given (``since``/``until`` on the start time)."""

    limit: int
    before: int | None = None
    owner: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    name: str | None = None
    labels: tuple[str, ...] = ()


class Page(NamedTuple):
    """Records, newest first, and the cursor for the next page (None: this was the last)."""

    records: list[Encoded]
    next: int | None


class JobStore(Protocol):
    def open(self) -> list[Unfinished]:
        """Ready the store; the jobs an earlier daemon left running, to reconcile."""

    def record_lost(self, rows: list[Row]) -> None:
        """At start-up: write these final rows of jobs found gone, now."""

    def adopt(self, job: Job) -> None:
        """A running job of an earlier daemon, taken over."""

    def queued(self) -> list[Queued]:
        """At start-up: the queued jobs an earlier daemon left, oldest first (record and
        what their launch needs)."""

    def requeue(self, job: Job) -> None:
        """A queued job of an earlier daemon, rebuilt."""

    def changed(self, job: Job) -> None:
        """``job`` left the queue; ``pending`` covers it."""

    def close(self) -> Deferred[None]:
        """Write what is left and close; fires once done."""

    def add(self, job: Job) -> None:
        """A new job (running or failed to start), newest of all."""

    def running(self, job: Job) -> None:
        """``job`` now has a process (its pid is known)."""

    def ended(self, job: Job) -> None:
        """``job`` has ended; its record is final."""

    def get(self, job_id: str) -> Any:
        """The job with this id (a ``Job``, or a ``StoredJob`` once ended), or L{NotFound}."""

    def by_pid(self, pid: int) -> Any:
        """The running job with this pid, else the newest that had it; or L{NotFound}."""

    def by_request(self, owner: str, request_id: str) -> tuple[Any, bytes] | None:
        """``owner``'s job started with this ``request_id``, and the digest of its start."""

    def ids_by_prefix(self, prefix: str, owner: str | None, limit: int) -> list[str]:
        """Up to ``limit`` ids starting with ``prefix``, of ``owner``'s jobs (None: all)."""

    def by_name(self, owner: str, name: str) -> Any:
        """``owner``'s newest job named ``name``, or L{NotFound}."""

    def running_with_pid(self, pid: int) -> Job | None:
        """The running job whose process has this pid, if any."""

    def running_jobs(self) -> list[Job]:
        """Every running job, newest first."""

    def newest_first(self) -> list[Any]:
        """Every job, newest first (for tests and small tables: ``page`` is the way)."""

    def page(self, query: ListQuery) -> Page:
        """One page of ``list``."""

    def pending(self) -> Deferred[None] | None:
        """Fires once every change made so far is committed; None when nothing waits."""

    @property
    def short(self) -> str | None:
        """Why new jobs are refused (the store is short of space), or None."""

    def expire(self, before: float | None, keep: int | None, spared: frozenset[str],
               batch: int = 1000) -> Deferred[list[tuple[str, str | None]]]:
        """Delete ended jobs that ended before ``before`` or lie past the newest ``keep``
        ended ones, except ``spared``; fires with (id, log_dir) of each, ``batch`` at most."""

    def forget(self, job_id: str) -> Deferred[None]:
        """Delete one ended job."""


class MemoryStore:
    """Jobs in memory, for the daemon's lifetime (about 1.5 KiB per ended job)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Job] = {}
        # Start order: a job's cursor is its index + 1; a forgotten job leaves a None.
        self._history: list[Job | None] = []
        self._index: dict[str, int] = {}
        self._running_by_pid: dict[int, Job] = {}
        # The newest job that had each pid: a lookup by pid is one dict access whatever
        # the history, so its time says nothing about jobs the caller may not see.
        self._newest_by_pid: dict[int, Job] = {}
        self._requests: dict[tuple[str, str], Job] = {}

    def open(self) -> list[Unfinished]:
        return []

    def record_lost(self, rows: list[Row]) -> None:
        raise AssertionError("a memory store has no earlier jobs")

    def adopt(self, job: Job) -> None:
        raise AssertionError("a memory store has no earlier jobs")

    def queued(self) -> list[Queued]:
        return []

    def requeue(self, job: Job) -> None:
        raise AssertionError("a memory store has no earlier jobs")

    def changed(self, job: Job) -> None:
        pass

    def close(self) -> Deferred[None]:
        return succeed(None)

    def add(self, job: Job) -> None:
        self._by_id[job.id] = job
        self._index[job.id] = len(self._history)
        self._history.append(job)
        if job.request is not None:
            self._requests[job.owner, job.request[0]] = job

    def running(self, job: Job) -> None:
        if job.pid is not None:
            self._running_by_pid[job.pid] = job
            self._newest_by_pid[job.pid] = job

    def ended(self, job: Job) -> None:
        if job.pid is None:
            return
        if self._running_by_pid.get(job.pid) is job:
            del self._running_by_pid[job.pid]
        newest = self._newest_by_pid.get(job.pid)
        if newest is None or newest.started <= job.started:
            self._newest_by_pid[job.pid] = job  # ended before it was marked running

    def get(self, job_id: str) -> Job:
        try:
            return self._by_id[job_id]
        except (KeyError, TypeError):
            raise NotFound(f"no such job: {job_id}") from None

    def by_pid(self, pid: int) -> Job:
        job = self._running_by_pid.get(pid) or self._newest_by_pid.get(pid)
        if job is None:
            raise NotFound(f"no such job: {pid}")
        return job

    def running_with_pid(self, pid: int) -> Job | None:
        return self._running_by_pid.get(pid)

    def ids_by_prefix(self, prefix: str, owner: str | None, limit: int) -> list[str]:
        return sorted(job_id for job_id, job in self._by_id.items()
                      if job_id.startswith(prefix) and owner in (None, job.owner))[:limit]

    def by_name(self, owner: str, name: str) -> Job:
        for job in reversed(self._history):
            if job is not None and job.owner == owner and job.name == name:
                return job
        raise NotFound(f"no such job: {name}")

    def by_request(self, owner: str, request_id: str) -> tuple[Job, bytes] | None:
        job = self._requests.get((owner, request_id))
        if job is None or job.request is None:
            return None
        return job, job.request[1]

    def running_jobs(self) -> list[Job]:
        return [j for j in reversed(self._history)
                if j is not None and not j.ended and j.state != QUEUED]

    def newest_first(self) -> list[Job]:
        return [j for j in reversed(self._history) if j is not None]

    def page(self, query: ListQuery) -> Page:
        end = len(self._history) if query.before is None else min(query.before - 1,
                                                                   len(self._history))
        records: list[Encoded] = []
        i = end - 1
        while i >= 0 and len(records) < query.limit:
            job = self._history[i]
            if job is not None and matches(job, query):
                records.append(job.packed())
            i -= 1
        more = any(j is not None and matches(j, query) for j in self._history[i::-1]
                   ) if i >= 0 else False
        return Page(records, i + 2 if more else None)

    def pending(self) -> Deferred[None] | None:
        return None

    short = None

    def expire(self, before: float | None, keep: int | None, spared: frozenset[str],
               batch: int = 1000) -> Deferred[list[tuple[str, str | None]]]:
        ended = [job for job in self._history
                 if job is not None and job.ended and job.id not in spared]
        victims = [job for job in ended if before is not None
                   and job.ended_time is not None and job.ended_time < before]
        if keep is not None and len(ended) > keep:
            victims += ended[:len(ended) - keep]
        gone = list({job.id: job for job in victims}.values())[:batch]
        for job in gone:
            self._drop(job)
        return succeed([(job.id, job.log_dir) for job in gone])

    def forget(self, job_id: str) -> Deferred[None]:
        job = self._by_id.get(job_id)
        if job is not None:
            self._drop(job)
        return succeed(None)

    def _drop(self, job: Job) -> None:
        del self._by_id[job.id]
        self._history[self._index.pop(job.id)] = None
        if job.pid is not None and self._newest_by_pid.get(job.pid) is job:
            del self._newest_by_pid[job.pid]
        if job.request is not None:
            self._requests.pop((job.owner, job.request[0]), None)


def matches(job: Any, query: ListQuery) -> bool:
    """Whether ``job`` passes ``query``'s filters (its cursor and limit aside)."""
    return ((query.owner is None or job.owner == query.owner)
            and (query.state is None or job.state == query.state)
            and (query.since is None or job.started >= query.since)
            and (query.until is None or job.started < query.until)
            and (query.name is None or job.name == query.name)
            and all(_has_label(job.labels, label) for label in query.labels))


def _has_label(labels: dict[str, str] | None, label: str) -> bool:
    key, _, value = label.partition("=")
    return labels is not None and labels.get(key) == value
