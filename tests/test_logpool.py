"""The spare log directory pool: spares become jobs' directories, refills, the fallback when
none is ready, leftovers swept at start, cleanup at stop; on real files, with the worker
thread stood in for (unit) and real (on the reactor)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import fds_but_spares, open_fd_count, until
from twisted.internet.defer import Deferred

from jobworker.jobs.logpool import BATCH, SIZE, LogDirPool
from jobworker.jobs.logs import LogStore, current_umask
from jobworker.jobs.manager import JobManager
from jobworker.testing import ProcessReactor
from jobworker.wire.record import EXITED, FAILED, RUNNING

T0 = 1_795_000_000.25
BUSY = 1e-3  # CPU seconds per spare the fake clock reports: above busy_cost, keep refilling


class ManualThreads:
    """Stands in for the thread pool: holds each task until the test runs it (here)."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.tasks.append((f, args, d))
        return d

    def run_one(self) -> None:
        f, args, d = self.tasks.pop(0)
        d.callback(f(*args))

    def run_all(self) -> None:
        while self.tasks:
            self.run_one()


class StepClock:
    """A CPU clock that advances ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def reactor() -> ProcessReactor:
    return ProcessReactor.at(T0)


@pytest.fixture
def threads() -> ManualThreads:
    return ManualThreads()


@pytest.fixture
def store(tmp_path: Path) -> LogStore:
    return LogStore(str(tmp_path / "state" / "logs"))


@pytest.fixture
def clock() -> StepClock:
    return StepClock(BUSY * BATCH)


@pytest.fixture
def pool(reactor: ProcessReactor, store: LogStore, threads: ManualThreads,
         clock: StepClock) -> Iterator[LogDirPool]:
    p = LogDirPool(reactor, store, run_in_thread=threads, cpu_clock=clock)
    yield p
    if p.running:
        p.stopService()
        threads.run_all()


def spare_dirs(store: LogStore) -> list[Path]:
    root = Path(store.root) / ".spare"
    return [s for g in (root.iterdir() if root.exists() else ()) for s in g.iterdir()]


def manager_with(reactor: ProcessReactor, store: LogStore, pool: LogDirPool,
                 spawner: Any = None) -> JobManager:
    kw = {"spawner": spawner} if spawner is not None else {}
    return JobManager(reactor, store, killpg=reactor.killpg, spare_logs=pool, **kw)


def test_a_spare_becomes_the_jobs_directory(reactor: ProcessReactor, store: LogStore,
                                            threads: ManualThreads, clock: StepClock) -> None:
    """A start renames a ready spare to <id>-<stamp>: empty files, modes 0750/0640 even
    under umask 077, and the child's fds 1 and 2 are that directory's files."""
    old = os.umask(0o077)
    try:
        pool = LogDirPool(reactor, store, run_in_thread=threads, cpu_clock=clock)
        pool.startService()
    finally:
        os.umask(old)
    threads.run_all()
    assert pool.ready == SIZE
    spares = {s.stat().st_ino: s for s in spare_dirs(store)}
    seen: dict[int, str] = {}

    def spawner(reactor_: Any, protocol: Any, executable: str, args: Any, env: Any, cwd: str,
                out: int, err: int) -> Any:
        seen[1] = os.readlink(f"/proc/self/fd/{out}")
        seen[2] = os.readlink(f"/proc/self/fd/{err}")
        return reactor.spawnProcess(protocol, executable, args, env, path=cwd)

    job = manager_with(reactor, store, pool, spawner).start("alice", "true", [])
    assert job.state == RUNNING
    log_dir = Path(job.log_dir)
    assert log_dir.name == f"{job.id}-20261118T110640.250000Z" and log_dir.parent == Path(
        store.root)
    assert log_dir.stat().st_ino in spares and not spares[log_dir.stat().st_ino].exists()
    assert pool.ready == SIZE - 1 and len(spare_dirs(store)) == SIZE - 1
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o750
    for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
        path = log_dir / name
        assert path.stat().st_size == 0 and stat.S_IMODE(path.stat().st_mode) == 0o640
        assert seen[fd] == str(path)
    pool.stopService()


def test_an_empty_pool_falls_back_to_making_the_directory(
        reactor: ProcessReactor, store: LogStore, threads: ManualThreads,
        pool: LogDirPool) -> None:
    """Before any spare is ready a start makes its own directory; only one refill runs."""
    pool.startService()
    manager = manager_with(reactor, store, pool)
    jobs = [manager.start("alice", "true", []) for _ in range(3)]
    assert pool.ready == 0 and len(threads.tasks) == 1
    for job in jobs:
        assert job.state == RUNNING
        assert sorted(p.name for p in Path(job.log_dir).iterdir()) == ["stderr.log",
                                                                       "stdout.log"]
        assert all(p.stat().st_size == 0 for p in Path(job.log_dir).iterdir())


def test_refill_starts_below_low_water_and_fills_in_batches(
        reactor: ProcessReactor, store: LogStore, threads: ManualThreads,
        pool: LogDirPool) -> None:
    """Takes down to the low-water mark start nothing; one below starts one refill, which
    goes on batch by batch until the pool is full again."""
    pool.startService()
    threads.run_all()
    assert pool.ready == SIZE and threads.tasks == []
    manager = manager_with(reactor, store, pool)
    for _ in range(SIZE - SIZE // 2):
        manager.start("alice", "true", [])
    assert pool.ready == SIZE // 2 and threads.tasks == []
    for _ in range(3):
        manager.start("alice", "true", [])
    assert len(threads.tasks) == 1
    threads.run_one()
    assert pool.ready == SIZE // 2 - 3 + BATCH and len(threads.tasks) == 1
    threads.run_all()
    assert pool.ready == SIZE and len(spare_dirs(store)) == SIZE


def test_cheap_spares_are_made_one_batch_per_probe_interval(
        reactor: ProcessReactor, store: LogStore, threads: ManualThreads) -> None:
    """While making a spare costs little CPU the pool does not refill on demand: starts
    make their own directory, and one batch is made per probe interval."""
    pool = LogDirPool(reactor, store, run_in_thread=threads, cpu_clock=StepClock(1e-6),
                      probe_interval=1.0)
    pool.startService()
    threads.run_all()
    assert pool.ready == BATCH
    manager = manager_with(reactor, store, pool)
    for _ in range(BATCH + 5):
        assert manager.start("alice", "true", []).state == RUNNING
    assert pool.ready == 0 and threads.tasks == []
    reactor.advance(1.0)
    assert len(threads.tasks) == 1
    pool.stopService()
    threads.run_all()


def test_leftovers_of_a_crash_are_swept_at_start(store: LogStore, threads: ManualThreads,
                                                 pool: LogDirPool) -> None:
    """Whatever a daemon left in .spare is removed before the first spare is made."""
    left = Path(store.root) / ".spare" / "9" / "77"
    left.mkdir(parents=True)
    (left / "stdout.log").write_bytes(b"old output")
    (Path(store.root) / ".spare" / "junk").write_text("x")
    pool.startService()
    threads.run_all()
    assert not left.exists() and not (Path(store.root) / ".spare" / "junk").exists()
    assert len(spare_dirs(store)) == SIZE
    assert all((s / n).stat().st_size == 0 for s in spare_dirs(store)
               for n in ("stdout.log", "stderr.log"))


def test_stop_closes_every_descriptor_and_removes_the_spares(
        reactor: ProcessReactor, store: LogStore, threads: ManualThreads,
        pool: LogDirPool) -> None:
    """At stop the spares' fds are closed and .spare is gone; no refill or take after."""
    before = open_fd_count(os.getpid())
    pool.startService()
    threads.run_all()
    assert open_fd_count(os.getpid()) == before + 2 * SIZE
    d = pool.stopService()
    assert d.called
    assert open_fd_count(os.getpid()) == before
    assert not (Path(store.root) / ".spare").exists()
    assert pool.take(os.path.join(store.root, "x")) is None and threads.tasks == []
    assert reactor.getDelayedCalls() == []


def test_stop_waits_for_a_refill_under_way(store: LogStore, threads: ManualThreads,
                                           pool: LogDirPool) -> None:
    """A refill running at stop is waited for, and what it made is closed and removed."""
    before = open_fd_count(os.getpid())
    pool.startService()
    d = pool.stopService()
    assert not d.called
    threads.run_all()
    assert d.called
    assert open_fd_count(os.getpid()) == before
    assert not (Path(store.root) / ".spare").exists()


def test_a_failing_refill_is_logged_and_retried_later(
        reactor: ProcessReactor, tmp_path: Path, threads: ManualThreads, clock: StepClock,
        events: list[dict[str, Any]]) -> None:
    """If spares cannot be made the error is logged, starts fall back, and the pool tries
    again after retry_after."""
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    store = LogStore(str(blocker / "logs"))
    pool = LogDirPool(reactor, store, run_in_thread=threads, cpu_clock=clock,
                      retry_after=5.0)
    pool.startService()
    threads.run_all()
    [failed] = [e for e in events if e.get("event") == "logs.spares_failed"]
    assert "Not a directory" in failed["error"]
    job = manager_with(reactor, store, pool).start("alice", "true", [])
    assert job.state == FAILED and "cannot create job logs" in (job.error or "")
    assert threads.tasks == []
    blocker.unlink()
    reactor.advance(5.0)
    threads.run_all()
    assert pool.ready == SIZE
    pool.stopService()


def test_a_spare_lost_behind_the_pools_back_falls_back(
        reactor: ProcessReactor, store: LogStore, threads: ManualThreads, pool: LogDirPool,
        events: list[dict[str, Any]]) -> None:
    """A spare removed by someone else is given up (its fds closed, a warning logged) and
    the job makes its own directory."""
    pool.startService()
    threads.run_all()
    for group in (Path(store.root) / ".spare").iterdir():
        shutil.rmtree(group)
    before = open_fd_count(os.getpid())
    job = manager_with(reactor, store, pool).start("alice", "true", [])
    assert job.state == RUNNING and (Path(job.log_dir) / "stdout.log").exists()
    assert [e["event"] for e in events if e.get("event", "").startswith("logs.")] == [
        "logs.spare_lost"]
    assert open_fd_count(os.getpid()) == before - 2


def test_current_umask_reads_without_changing_it() -> None:
    """current_umask gives the process umask, and leaves it as it was."""
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027
    finally:
        os.umask(old)


# -- on the real reactor, with real worker threads ----------------------------------------


@pytest.mark.timeout(60, method="thread")
@pytest_twisted.ensureDeferred
async def test_real_threads_jobs_use_spares_and_output_is_exact(tmp_path: Path) -> None:
    """With the reactor's thread pool, 100 real jobs take spares, write exactly their own
    output, and stopping the pool leaves no descriptor and no spare behind."""
    from twisted.internet import reactor

    store = LogStore(str(tmp_path / "logs"))
    pool = LogDirPool(reactor, store, busy_cost=0.0)  # always refill
    manager = JobManager(reactor, store, grace=2.0, spare_logs=pool)
    pool.startService()
    await until(lambda: pool.ready == SIZE, what="the pool to fill")
    spare_inodes = {s.stat().st_ino for s in spare_dirs(store)}
    jobs = [manager.start("alice", "sh", ["-c", 'printf "%s" "$1"; printf "e%s" "$1" >&2',
                                          "sh", str(n)]) for n in range(100)]
    for job in jobs:
        d = job.when_ended()
        d.addTimeout(10, reactor)
        assert (await d).state == EXITED
    for n, job in enumerate(jobs):
        assert (Path(job.log_dir) / "stdout.log").read_bytes() == str(n).encode()
        assert (Path(job.log_dir) / "stderr.log").read_bytes() == f"e{n}".encode()
    assert Path(jobs[0].log_dir).stat().st_ino in spare_inodes
    baseline = fds_but_spares(os.getpid())
    await pool.stopService()
    # (open_fd_count also counts the descriptor its own listing of /proc/self/fd holds.)
    assert fds_but_spares(os.getpid()) == baseline == open_fd_count(os.getpid()) - 1
    assert not (Path(store.root) / ".spare").exists()
