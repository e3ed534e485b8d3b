"""What the job manager tells an observer (the daemon's metrics) about jobs: a seam, so
the jobs layer counts nothing itself and imports no metrics library."""

from __future__ import annotations

from typing import Protocol

from jobworker.jobs.job import Job


class JobObserver(Protocol):
    """Told, on the reactor thread, of each job's process starting and each job ending."""

    def job_started(self, job: Job) -> None:
        """``job``'s process was spawned (it may have ended already)."""

    def job_adopted(self, job: Job) -> None:
        """``job``, left running by an earlier daemon, was adopted at start-up."""

    def job_ended(self, job: Job) -> None:
        """``job`` ended, in whatever state (``failed`` ones never had a process)."""


class Unobserved:
    """The observer of a manager nobody watches: does nothing."""

    def job_started(self, job: Job) -> None:
        pass

    def job_adopted(self, job: Job) -> None:
        pass

    def job_ended(self, job: Job) -> None:
        pass
