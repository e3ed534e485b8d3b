"""The durable job table on a fake reactor: a real SQLite file, its writes run at once
(``run_in_writer``) or held back to show the barrier; and its SQL on its own."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred

from jobworker.jobs import sql
from jobworker.jobs.durable import DurableStore
from jobworker.jobs.logs import LogStore
from jobworker.jobs.manager import JobManager
from jobworker.jobs.recovery import GONE, sort_out
from jobworker.jobs.store import ListQuery, MemoryStore
from jobworker.jobs.stored import StoredJob
from jobworker.testing import ProcessReactor
from jobworker.wire.codec import decode
from jobworker.wire.errors import NotFound, Unavailable
from jobworker.wire.record import EXITED, LOST, RUNNING

T0 = 1_795_000_000.25


class Writer:
    """Runs the store's writes when the test says (``run``), or at once (``eager``)."""

    def __init__(self, eager: bool = True) -> None:
        self.eager = eager
        self.batches: list[list[sql.Row]] = []
        self.held: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []
        self.fail_with: BaseException | None = None

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        self.batches.append(list(args[1]))
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            return fail(error)
        if self.eager:
            return maybeDeferred(f, *args)
        d: Deferred[Any] = Deferred()
        self.held.append((d, f, args))
        return d

    def run(self) -> None:
        held, self.held = self.held, []
        for d, f, args in held:
            d.callback(f(*args))


@pytest.fixture
def reactor() -> ProcessReactor:
    return ProcessReactor.at(T0)


def make(reactor: ProcessReactor, tmp_path: Path, writer: Writer
         ) -> tuple[DurableStore, JobManager]:
    store = DurableStore(reactor, str(tmp_path / "jobs.db"), run_in_writer=writer)
    manager = JobManager(reactor, LogStore(str(tmp_path / "logs")), killpg=reactor.killpg,
                         store=store)
    manager.startService()
    return store, manager


def turn(reactor: ProcessReactor) -> None:
    """End the reactor turn: the store writes what changed in it."""
    reactor.advance(0)


def test_a_reply_waits_for_the_commit_of_what_it_reports(reactor: ProcessReactor,
                                                          tmp_path: Path) -> None:
    writer = Writer(eager=False)
    store, manager = make(reactor, tmp_path, writer)
    job = manager.start("alice", "sleep", ["60"])
    barrier = manager.pending()
    assert barrier is not None and not barrier.called
    turn(reactor)
    assert not barrier.called  # handed to the writer, not yet committed
    assert sql.record_by_id(store._reading(), job.id) is None
    writer.run()
    assert barrier.called and manager.pending() is None
    assert decode(sql.record_by_id(store._reading(), job.id))["state"] == RUNNING


def test_changes_made_in_one_turn_are_one_transaction(reactor: ProcessReactor,
                                                      tmp_path: Path) -> None:
    writer = Writer()
    store, manager = make(reactor, tmp_path, writer)
    jobs = [manager.start("alice", "sleep", ["60"]) for _ in range(50)]
    reactor.process(jobs[0].pid).exit(0)  # type: ignore[arg-type]
    turn(reactor)
    assert len(writer.batches) == 1 and len(writer.batches[0]) == 50
    assert writer.batches[0][0].state == EXITED  # the latest record, written once


def test_an_ended_job_is_served_from_the_table_once_committed(reactor: ProcessReactor,
                                                              tmp_path: Path) -> None:
    writer = Writer(eager=False)
    store, manager = make(reactor, tmp_path, writer)
    job = manager.start("alice", "sleep", ["60"])
    pid = job.pid
    reactor.process(pid).exit(3)  # type: ignore[arg-type]
    turn(reactor)
    assert manager.get(job.id) is job  # not yet committed: from memory
    writer.run()
    stored = manager.get(job.id)
    assert isinstance(stored, StoredJob)
    assert stored.record() == job.record()
    assert bytes(stored.packed()) == bytes(job.packed())
    assert manager.find(pid).id == job.id  # type: ignore[arg-type]
    assert store._live == {} and store._newest_by_pid == {}
    assert manager.stop(stored).result.state == EXITED  # type: ignore[attr-defined]
    with pytest.raises(NotFound):
        manager.get("no-such-job")


def test_a_full_disk_gives_up_the_reserve_and_refuses_new_starts(
        reactor: ProcessReactor, tmp_path: Path, events: list[dict[str, Any]]) -> None:
    writer = Writer(eager=False)
    store, manager = make(reactor, tmp_path, writer)
    reserve = Path(store.reserve_path)
    assert reserve.stat().st_size > 0
    job = manager.start("alice", "sleep", ["60"])
    writer.fail_with = sqlite3.OperationalError("database or disk is full")
    turn(reactor)
    assert not reserve.exists() or reserve.stat().st_size == 0
    assert [e["event"] for e in events if e.get("event", "").startswith("table.r")] == [
        "table.reserve_used"]
    with pytest.raises(Unavailable, match="reserve"):
        manager.start("alice", "true", [])
    writer.run()  # written again at once, and the reserve made again after it
    assert decode(sql.record_by_id(store._reading(), job.id))["state"] == RUNNING
    assert store.short is None and reserve.stat().st_size > 0
    manager.start("alice", "true", [])


def test_a_failed_write_is_retried_and_keeps_the_jobs_in_memory(
        reactor: ProcessReactor, tmp_path: Path) -> None:
    writer = Writer()
    store, manager = make(reactor, tmp_path, writer)
    job = manager.start("alice", "sleep", ["60"])
    reactor.process(job.pid).exit(0)  # type: ignore[arg-type]
    writer.fail_with = sqlite3.OperationalError("disk I/O error")
    turn(reactor)
    assert store.failures == 1 and manager.get(job.id) is job
    reactor.advance(1.0)
    assert isinstance(manager.get(job.id), StoredJob)


def test_pages_follow_the_cursor_and_filters(reactor: ProcessReactor,
                                             tmp_path: Path) -> None:
    writer = Writer()
    store, manager = make(reactor, tmp_path, writer)
    memory = MemoryStore()
    other = JobManager(reactor, LogStore(str(tmp_path / "logs2")), killpg=reactor.killpg,
                       store=memory)
    ids: dict[str, list[str]] = {"durable": [], "memory": []}
    for i in range(23):
        for name, m in (("durable", manager), ("memory", other)):
            job = m.start("alice" if i % 3 else "bob", "sleep", ["60"])
            if i % 2:
                reactor.process(job.pid).exit(0)  # type: ignore[arg-type]
            ids[name].append(job.id)
        reactor.advance(1)
    turn(reactor)
    for name, s in (("durable", store), ("memory", memory)):
        seen, cursor = [], None
        while True:
            page = s.page(ListQuery(limit=5, before=cursor, owner="alice", state=EXITED))
            seen += [decode(r)["id"] for r in page.records]
            if page.next is None:
                break
            cursor = page.next
        expected = [ids[name][i] for i in range(22, -1, -1) if i % 3 and i % 2]
        assert seen == expected, name
        since = s.page(ListQuery(limit=100, since=T0 + 20))
        assert [decode(r)["id"] for r in since.records] == ids[name][:19:-1], name


def test_request_ids_are_found_in_memory_and_in_the_table(reactor: ProcessReactor,
                                                          tmp_path: Path) -> None:
    writer = Writer(eager=False)
    store, manager = make(reactor, tmp_path, writer)
    job = manager.start("alice", "true", [], request=("r1", b"digest"))
    found = manager.by_request("alice", "r1")
    assert found is not None and found[0] is job and found[1] == b"digest"
    assert manager.by_request("bob", "r1") is None
    turn(reactor)
    writer.run()
    turn(reactor)
    writer.run()
    found = manager.by_request("alice", "r1")
    assert found is not None and found[0].id == job.id and found[1] == b"digest"


def test_a_table_from_a_newer_daemon_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "jobs.db")
    conn = sql.connect(path)
    assert sql.migrate(conn, path) == 0
    assert sql.migrate(conn, path) == sql.VERSION
    conn.execute(f"PRAGMA user_version = {sql.VERSION + 1}")
    with pytest.raises(sql.TableError, match="newer than this daemon"):
        sql.migrate(conn, path)


def unfinished(job_id: str, pid: int | None, lo: int | None, hi: int | None
               ) -> sql.Unfinished:
    from jobworker.wire.codec import encode

    record = {"id": job_id, "owner": "alice", "state": RUNNING, "pid": pid, "error": None,
              "ended_at": None}
    return sql.Unfinished(1, job_id, pid, lo, hi, T0, encode(record))


def test_sort_out_adopts_only_the_same_process() -> None:
    seen: list[tuple[Any, ...]] = []

    def alive(pid: int, lo: int | None, hi: int | None) -> bool:
        seen.append((pid, lo, hi))
        return pid in (10, 12)

    jobs = [unfinished("a", 10, 5, 6), unfinished("b", 11, 5, 6), unfinished("c", None, None,
                                                                          None)]
    lost, adopt = sort_out(jobs, T0 + 60, alive, lambda job_id: (12, 5) if job_id == "c" else None)
    assert [(u.id, u.pid) for u in adopt] == [("a", 10), ("c", 12)]
    assert [(r.id, r.state, r.ended) for r in lost] == [("b", LOST, T0 + 60)]
    assert decode(lost[0].record)["error"] == GONE
    # "c" had no pid yet (the daemon died spawning it): found by its job id.
    assert seen == [(10, 5, 6), (11, 5, 6), (12, 5, 5)]
    lost, adopt = sort_out([unfinished("d", None, None, None)], T0, alive, lambda _: None)
    assert [r.id for r in lost] == ["d"] and adopt == []
