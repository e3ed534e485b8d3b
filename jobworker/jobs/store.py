"""Where jobs are kept: the seam a durable (SQLite) job table will slot into.

``MemoryStore`` keeps live ``Job`` objects for this daemon's lifetime.  A durable store
will persist ``Job.record()`` on every change and, on start-up, hand back records of jobs
a previous daemon ran (re-adopting those still running); the manager only uses the
methods below.
"""

from __future__ import annotations

from typing import Protocol

from jobworker.jobs.job import Job
from jobworker.wire.errors import NotFound


class JobStore(Protocol):
    def add(self, job: Job) -> None:
        """A new job (running or failed to start), newest of all."""

    def running(self, job: Job) -> None:
        """``job`` now has a process (its pid is known)."""

    def ended(self, job: Job) -> None:
        """``job`` has ended; its record is final."""

    def get(self, job_id: str) -> Job:
        """The job with this id, or L{NotFound}."""

    def by_pid(self, pid: int) -> Job:
        """The running job with this pid, else the newest that had it; or L{NotFound}."""

    def running_with_pid(self, pid: int) -> Job | None:
        """The running job whose process has this pid, if any."""

    def newest_first(self, running_only: bool = False) -> list[Job]:
        """Every job, newest first."""


class MemoryStore:
    """Jobs in memory, for the daemon's lifetime (about 1.5 KiB per ended job)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Job] = {}
        self._history: list[Job] = []  # start order
        self._running_by_pid: dict[int, Job] = {}
        # The newest job that had each pid: a lookup by pid is one dict access whatever
        # the history, so its time says nothing about jobs the caller may not see.
        self._newest_by_pid: dict[int, Job] = {}

    def add(self, job: Job) -> None:
        self._by_id[job.id] = job
        self._history.append(job)

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

    def newest_first(self, running_only: bool = False) -> list[Job]:
        return [j for j in reversed(self._history) if not running_only or not j.ended]
