"""The scheduler through the JobManager on a fake reactor: queued and cancelled jobs, the
daemon-wide and per-queue limits, quotas, the fair order, dependencies; and the
policy file's [queue] and [quota] tables."""

from __future__ import annotations

from typing import Any

import pytest

from jobworker.daemon.authz import Policy, PolicyError
from jobworker.jobs.job import Job
from jobworker.jobs.logs import LogStore
from jobworker.jobs.manager import JobManager
from jobworker.jobs.scheduler import QueuePolicy, Quota
from jobworker.testing import ProcessReactor
from jobworker.wire import errors
from jobworker.wire.record import CANCELLED, EXITED, QUEUED, RUNNING

T0 = 1_795_000_000.25


@pytest.fixture
def reactor() -> ProcessReactor:
    return ProcessReactor.at(T0)


def manager(reactor: ProcessReactor, tmp_path: Any, max_running: int | None = None,
            policy: QueuePolicy | None = None) -> JobManager:
    return JobManager(reactor, LogStore(str(tmp_path / "logs")), grace=1.0,
                      killpg=reactor.killpg, max_running=max_running,
                      queue_policy=(lambda: policy) if policy is not None else None)


def start(m: JobManager, owner: str = "alice", **kw: Any) -> Job:
    return m.start(owner, "sleep", ["60"], **kw)


def running(reactor: ProcessReactor) -> list[int]:
    """Pids of fake processes that have not ended: counted off the 'machine'."""
    return [p.pid for p in reactor.processes if not p.ended]


def finish_one(reactor: ProcessReactor, job: Job) -> None:
    assert job.pid is not None
    reactor.process(job.pid).exit(0)


def test_beyond_max_running_a_job_is_queued_and_starts_when_a_slot_frees(
        reactor: ProcessReactor, tmp_path: Any) -> None:
    """With --max-running 2 the third start is queued (no pid, started_at or log_dir; a
    queued_at), and it starts, in order, once a running job ends."""
    m = manager(reactor, tmp_path, max_running=2)
    a, b, c, d = (start(m) for _ in range(4))
    assert [j.state for j in (a, b, c, d)] == [RUNNING, RUNNING, QUEUED, QUEUED]
    wire = c.wire()
    assert (wire["pid"], wire["started_at"], wire["log_dir"]) == (None, None, None)
    assert wire["queued_at"] == "2026-11-18T11:06:40.250000Z"
    assert a.wire()["queued_at"] is None and m.queued == 2
    assert len(running(reactor)) == 2
    started = c.when_started()
    reactor.advance(3)
    finish_one(reactor, a)
    assert c.state == RUNNING and c.pid is not None and d.state == QUEUED
    assert started.called and c.wire()["started_at"] == "2026-11-18T11:06:43.250000Z"
    assert c.log_dir is not None and len(running(reactor)) == 2
    finish_one(reactor, b)
    finish_one(reactor, c)
    assert d.state == RUNNING and m.queued == 0 and len(running(reactor)) == 1


def test_stop_of_a_queued_job_cancels_it_and_it_never_runs(
        reactor: ProcessReactor, tmp_path: Any) -> None:
    """stop of a queued job: cancelled at once, its waiters told, its slot never taken."""
    m = manager(reactor, tmp_path, max_running=1)
    first, queued, last = start(m), start(m), start(m)
    waiter = queued.when_ended()
    follower = queued.when_started()
    record = m.stop(queued)
    assert record.called and queued.state == CANCELLED and queued.ended
    assert waiter.called and follower.called and queued.wire()["started_at"] is None
    assert queued.error == "stopped before it started"
    finish_one(reactor, first)
    assert last.state == RUNNING and queued.pid is None
    assert len(reactor.processes) == 2  # the cancelled one was never spawned
    assert first.state == EXITED


def test_one_identity_does_not_delay_another_by_more_than_one_turn(
        reactor: ProcessReactor, tmp_path: Any) -> None:
    """alice has 50 queued; bob's one job starts after at most one more of hers, and
    alice's own run first in, first out."""
    m = manager(reactor, tmp_path, max_running=1)
    alices = [start(m, "alice") for _ in range(51)]
    bob = start(m, "bob")
    order: list[Job] = []
    current = alices[0]
    for _ in range(4):
        finish_one(reactor, current)
        current = next(j for j in alices + [bob] if j.state == RUNNING)
        order.append(current)
    assert bob in order[:2]
    theirs = [j for j in order if j is not bob]
    assert theirs == alices[1:len(theirs) + 1]


def test_higher_priority_first_capped_by_max_priority(
        reactor: ProcessReactor, tmp_path: Any) -> None:
    """A queued job with a higher priority starts first; above the identity's
    max_priority (default 0) the start is refused."""
    policy = QueuePolicy(identities={"alice": Quota(max_priority=5)})
    m = manager(reactor, tmp_path, max_running=1, policy=policy)
    first, low, high = start(m), start(m), start(m, priority=5)
    with pytest.raises(errors.Forbidden, match="max_priority"):
        start(m, priority=6)
    with pytest.raises(errors.Forbidden, match="max_priority 0"):
        start(m, "bob", priority=1)
    finish_one(reactor, first)
    assert high.state == RUNNING and low.state == QUEUED


def test_named_queues_quotas_and_refusals(reactor: ProcessReactor, tmp_path: Any) -> None:
    """[queue.build] parallel = 1 holds a second build job while other queues run;
    max_running holds an identity's jobs; max_queued and unknown queues are refused."""
    policy = QueuePolicy(queues={"build": 1},
                         roles={"user": Quota(max_running=1, max_queued=2)},
                         identities={"carol": Quota(max_running=3)})
    m = manager(reactor, tmp_path, policy=policy)
    b1, b2 = start(m, "carol", queue="build"), start(m, "carol", queue="build")
    other = start(m, "carol")
    assert (b1.state, b2.state, other.state) == (RUNNING, QUEUED, RUNNING)
    # alice (role user: max_running 1, max_queued 2): one runs, two wait, a fourth is refused.
    mine = [m.start("alice", "sleep", ["60"], role="user") for _ in range(3)]
    assert [j.state for j in mine] == [RUNNING, QUEUED, QUEUED]
    with pytest.raises(errors.Unavailable, match="max_queued"):
        m.start("alice", "sleep", ["60"], role="user")
    with pytest.raises(errors.BadRequest, match="no such queue"):
        start(m, queue="nope")
    finish_one(reactor, b1)
    assert b2.state == RUNNING
    finish_one(reactor, mine[0])
    assert [j.state for j in mine[1:]] == [RUNNING, QUEUED]
    assert {r["queue"]: (r["running"], r["queued"], r["parallel"])
            for r in m.scheduler.counts()} == {"build": (1, 0, 1), "default": (2, 1, None)}


def test_a_cancelled_job_frees_its_place_under_max_queued(
        reactor: ProcessReactor, tmp_path: Any) -> None:
    """Cancelling a queued job gives its place back at once (max_queued counts it no
    more), and the queue skips it."""
    policy = QueuePolicy(identities={"alice": Quota(max_queued=1)})
    m = manager(reactor, tmp_path, max_running=1, policy=policy)
    first, waiting = start(m), start(m)
    m.stop(waiting)
    again = start(m)
    assert again.state == QUEUED
    finish_one(reactor, first)
    assert again.state == RUNNING and waiting.state == CANCELLED


def test_a_job_after_others_starts_once_all_have_exited_0(
        reactor: ProcessReactor, tmp_path: Any) -> None:
    """after=[a, b]: queued (no slot limit needed) until both exit 0, then it starts."""
    m = manager(reactor, tmp_path)
    a, b = start(m), start(m)
    dependant = start(m, after=[a, b])
    assert dependant.state == QUEUED and dependant.wire()["after"] == [a.id, b.id]
    assert m.queued == 1
    finish_one(reactor, a)
    assert dependant.state == QUEUED
    finish_one(reactor, b)
    assert dependant.state == RUNNING and dependant.pid is not None


def test_a_failed_or_stopped_dependency_cancels_its_dependants_in_turn(
        reactor: ProcessReactor, tmp_path: Any) -> None:
    """A dependency exiting 1 cancels its dependant, whose own dependant is cancelled in
    turn; a stopped one cancels too; one that had already failed cancels at admission."""
    m = manager(reactor, tmp_path)
    a = start(m)
    child = start(m, after=[a])
    grandchild = start(m, after=[child])
    assert a.pid is not None
    reactor.process(a.pid).exit(1)
    assert child.state == CANCELLED and "exited with exit code 1" in (child.error or "")
    assert grandchild.state == CANCELLED and child.id in (grandchild.error or "")
    late = start(m, after=[a])
    assert late.state == CANCELLED and late.pid is None and m.queued == 0
    b = start(m)
    waits = start(m, after=[b])
    m.stop(b)
    assert b.pid is not None
    reactor.process(b.pid).kill(15)  # the TERM it was sent ends it
    assert b.ended and waits.state == CANCELLED and "stopped" in (waits.error or "")
    assert len(reactor.processes) == 2  # a and b: no dependant ever ran


@pytest.mark.parametrize("text, problem", [
    ("[queue.build]\nparallel = 0\n", "parallel must be a whole number from 1"),
    ("[queue.build]\nwidth = 2\n", "takes only parallel"),
    ("[quota.role.boss]\nmax_running = 1\n", "unknown roles boss"),
    ("[quota.identity.alice]\nmax_jobs = 1\n", "unknown keys max_jobs"),
    ("[quota.identity.alice]\nmax_queued = -1\n", "max_queued must be a whole number"),
    ("[quota.identity.alice]\nmax_priority = 1.5\n", "max_priority must be a whole number"),
    ("[quota.group.x]\n", "[quota] holds"),
])
def test_bad_queue_and_quota_tables_are_refused(tmp_path: Any, text: str,
                                                problem: str) -> None:
    """A malformed [queue] or [quota] table makes the policy invalid, saying where."""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        Policy.load(str(path))
    assert problem in str(caught.value)


def test_queue_and_quota_tables_are_read(tmp_path: Any) -> None:
    """[queue.NAME] and [quota.*] land in the policy; an identity's table replaces its
    role's as a whole."""
    path = tmp_path / "policy.toml"
    path.write_text("[queue.build]\nparallel = 4\n[quota.role.user]\nmax_running = 2\n"
                    "max_queued = 10\n[quota.identity.alice]\nmax_priority = 3\n")
    queues = Policy.load(str(path)).queues
    assert queues.parallel("build") == 4 and queues.knows("default")
    assert not queues.knows("nope")
    assert queues.quota("bob", "user") == Quota(2, 10, 0)
    assert queues.quota("alice", "user") == Quota(None, None, 3)


def test_a_version_1_table_is_migrated_with_its_rows(tmp_path: Any) -> None:
    """A table an older daemon made (schema 1, one job in it) gains the launch, name and
    labels columns on open; its row is kept and reads as before."""
    from jobworker.jobs import sql

    path = str(tmp_path / "jobs.db")
    conn = sql.connect(path)
    for statement in sql._statements(sql.MIGRATIONS[0]):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs (id, owner, state, started, record) VALUES "
                 "('old', 'alice', 'exited', 1.0, x'80')")
    assert sql.migrate(conn, path) == 1
    assert sql.record_by_id(conn, "old") == b"\x80"
    assert sql.queued(conn) == [] and sql.record_by_name(conn, "alice", "x") is None
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert {"launch", "name", "labels"} <= columns
    conn.close()


def test_run_as_reuses_a_users_entry_for_a_few_seconds() -> None:
    """A start resolves its user from a cache kept NAMED_FOR seconds (the lookup reads the
    whole group database: a 10,000-job submit would pay it 10,000 times), then looks again."""
    from jobworker.daemon.runas import NAMED_FOR, DynamicUids, RunAs

    now = [100.0]
    policy = Policy(run_as={"alice": "root"})
    runas = RunAs(lambda: policy, DynamicUids("/nonexistent", 61184, 65519),
                  clock=lambda: now[0])
    first = runas.credentials("alice", None)
    assert first is not None and first.uid == 0
    assert runas.credentials("alice", None) is first
    now[0] += NAMED_FOR + 0.1
    again = runas.credentials("alice", None)
    assert again == first and again is not first
