"""After a restart or a crash: the jobs the table says were running, checked against the
machine.  One whose process is gone becomes ``lost``; one still running is adopted, watched
on a pidfd until it ends (its exit status then goes to its new parent, so it ends ``lost``
too, with its end time)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.jobs import sql
from jobworker.jobs.environment import JOB_ID_VAR
from jobworker.jobs.procstat import find_job_leader, is_running
from jobworker.wire.codec import decode, encode
from jobworker.wire.record import LOST
from jobworker.wire.timestamps import iso8601

log = Logger()

#: Why a job recorded running was found gone.
GONE = ("the daemon stopped while the job ran, and the job's process was gone when it "
        "came back: its exit status is unknown")
#: Why a job committed but not yet spawned was found gone.
NEVER_STARTED = ("the daemon stopped while starting the job, and no process of it was "
                 "found when it came back: it did not run, or ended unseen")


def by_job_id(job_id: str) -> tuple[int, int] | None:
    """The leader of the job spawned with this id, found by its environment."""
    return find_job_leader(f"{JOB_ID_VAR}={job_id}".encode())


def sort_out(unfinished: list[sql.Unfinished], now: float,
             alive: Callable[[int, int | None, int | None], bool] = is_running,
             find: Callable[[str], tuple[int, int] | None] = by_job_id,
             ) -> tuple[list[sql.Row], list[sql.Unfinished]]:
    """Split the jobs recorded running into the rows that record them ``lost`` (their
    process is gone, or its pid now names another process) and those to adopt.  A job
    committed but not yet given its pid (the daemon died while spawning it) is looked
    for by its job id."""
    lost: list[sql.Row] = []
    adopt: list[sql.Unfinished] = []
    for job in unfinished:
        if job.pid is None:
            found = find(job.id)
            if found is not None:
                pid, started = found
                job = job._replace(pid=pid, proc_start=started, proc_start_hi=started)
        if job.pid is not None and alive(job.pid, job.proc_start, job.proc_start_hi):
            adopt.append(job)
            continue
        record = decode(job.record)
        record.update(state=LOST, ended_at=iso8601(now),
                      error=GONE if job.pid is not None else NEVER_STARTED)
        lost.append(sql.Row(job.id, record["owner"], LOST, job.pid, job.proc_start,
                            job.proc_start_hi, job.started, now, None, None,
                            encode(record)))
    return lost, adopt


def watch_adopted(reactor: Any, pid: int, ended: Callable[[Failure], None],
                  still_ours: Callable[[], bool]) -> bool:
    """Call ``ended`` once ``pid`` (not our child) has exited; False if it cannot be
    watched (gone, no longer ``still_ours`` once a pidfd holds it, or no pidfd here)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return False
    if not still_ours():
        os.close(pidfd)
        return False
    reactor.addReader(AdoptedWatcher(reactor, pid, pidfd, ended))
    return True


@implementer(IReadDescriptor)
class AdoptedWatcher:
    """Readable once the adopted process has exited."""

    def __init__(self, reactor: Any, pid: int, pidfd: int,
                 ended: Callable[[Failure], None]) -> None:
        self._reactor = reactor
        self._pid = pid
        self._fd = pidfd
        self._ended: Callable[[Failure], None] | None = ended

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return f"adopted({self._pid})"

    def doRead(self) -> None:
        self._reactor.removeReader(self)
        self._done()

    def connectionLost(self, reason: Failure) -> None:
        if self._fd >= 0:  # the reactor dropped us (shutdown)
            os.close(self._fd)
            self._fd = -1

    def _done(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(Failure(ProcessTerminated(None, None, None)))

