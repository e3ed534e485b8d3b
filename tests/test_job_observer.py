"""The job manager's observer (the seam the daemon's metrics hang on), on fakes: each
job is reported started once and ended once, a cgroup's late final usage included."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobworker.jobs.job import Job
from jobworker.jobs.logs import LogStore
from jobworker.jobs.manager import JobManager
from jobworker.testing import FakeCgroups, ProcessReactor
from jobworker.wire.record import EXITED, FAILED

T0 = 1_795_000_000.25


class Seen:
    """Records what the manager reports, as (what, job id, state)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def job_started(self, job: Job) -> None:
        self.events.append(("started", job.id, job.state))

    def job_adopted(self, job: Job) -> None:
        self.events.append(("adopted", job.id, job.state))

    def job_ended(self, job: Job) -> None:
        self.events.append(("ended", job.id, job.state))


@pytest.mark.parametrize("with_cgroups", [False, True])
def test_a_job_is_reported_started_once_and_ended_once(tmp_path: Path,
                                                        with_cgroups: bool) -> None:
    """One that runs and exits: started, then ended (once, though a job with a cgroup
    reaches the manager again when its final usage is read); one that cannot start:
    ended ``failed`` only."""
    reactor = ProcessReactor.at(T0)
    seen = Seen()
    manager = JobManager(reactor, LogStore(str(tmp_path / "logs")), killpg=reactor.killpg,
                         cgroups=FakeCgroups(reactor) if with_cgroups else None,
                         observer=seen)
    job = manager.start("alice", "sleep", ["60"])
    assert job.pid is not None
    reactor.process(job.pid).exit(0)
    reactor.advance(60)  # any cgroup polling and release
    assert job.done
    failed = manager.start("alice", "/no/such/program", [])
    reactor.advance(60)
    assert failed.state == FAILED
    assert seen.events == [("started", job.id, "running"), ("ended", job.id, EXITED),
                           ("ended", failed.id, FAILED)]
