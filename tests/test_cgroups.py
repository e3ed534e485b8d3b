"""Job cgroups: the v1 and v2 drivers on a fake cgroup tree, JobCgroup and the Job's stop
policy on a fake clock, the pool, and real daemons on this host's cgroups."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import Daemon, dead, until, wait_for
from twisted.internet import reactor as real_reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import Clock

from jobworker.client.api import connect
from jobworker.jobs import jobcgroup
from jobworker.jobs.cgpool import CgroupPool
from jobworker.jobs.cgroups import V1Driver, V2Driver, detect
from jobworker.jobs.jobcgroup import JobCgroup
from jobworker.jobs.logs import LogStore
from jobworker.jobs.manager import JobManager
from jobworker.testing import FakeCgroupFiles, FakeCgroups, FakeCgroupTree, ProcessReactor
from jobworker.wire.record import EXITED, FAILED, RUNNING, STOPPED

T0 = 1_795_000_000.25
GRACE = 5.0
JOB = "0b8f7e4c-54b4-4c2a-9d55-3f0e1a2b3c4d"


def fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "Deferred has not fired"
    return results[0]


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


# -- the drivers on a fake tree ----------------------------------------------------------------


@pytest.fixture(params=["v1", "v2"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> FakeCgroupTree:
    """A fake cgroup file system of either version (the test id says which ran)."""
    return FakeCgroupTree(str(tmp_path), request.param)


def test_detect_picks_the_version_and_the_daemons_own_cgroups(tree: FakeCgroupTree) -> None:
    """v1: a subtree under the daemon's cgroup in each controller's hierarchy (memory's is
    not the root); v2: one subtree under the daemon's v2 cgroup, with its controllers."""
    found = tree.detect("jw")
    driver = found.driver
    assert driver is not None and driver.version == tree.version
    base = f"{tree.root}/sys/fs/cgroup"
    if tree.version == "v1":
        assert isinstance(driver, V1Driver)
        assert driver.controllers == ("memory", "cpuacct", "blkio", "freezer")
        assert driver.roots[0] == f"{base}/memory/outer/daemon/jw"
        # cpu and pids only for jobs with such a limit: their subtrees are listed last.
        assert f"{base}/freezer/jw" in driver.roots and len(driver.roots) == 6
        assert driver.roots[-2:] == (f"{base}/cpu/jw", f"{base}/pids/jw")
    else:
        assert isinstance(driver, V2Driver)
        assert driver.controllers == ("memory", "cpu", "io", "pids")
        assert driver.roots == (f"{base}/svc/jw",)
    assert driver.paths(JOB) == [f"{r}/{JOB}" for r in driver.roots]


def test_detect_without_any_cgroup_mount_says_why(tmp_path: Path) -> None:
    """No cgroup file system mounted: no driver, and a reason to log."""
    (tmp_path / "mountinfo").write_text("22 1 0:21 / /proc rw - proc proc rw\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    found = detect("jw", mountinfo=str(tmp_path / "mountinfo"), own=str(tmp_path / "cgroup"))
    assert found.driver is None and "no cgroup hierarchy" in found.reason


def test_detect_v2_without_controllers_prefers_v1_on_a_hybrid_host(tmp_path: Path) -> None:
    """This host's layout: v1 controllers plus a controller-less v2 mount: v1 is used."""
    tree = FakeCgroupTree(str(tmp_path), "v1")
    with open(tree.mountinfo, "a") as f:
        f.write("50 31 0:50 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    (tmp_path / "sys/fs/cgroup/unified").mkdir()
    found = tree.detect("jw")
    assert found.driver is not None and found.driver.version == "v1"


def test_enter_and_leave_move_the_calling_thread(tree: FakeCgroupTree) -> None:
    """v1 writes 0 (the calling thread) into the job's ``tasks`` in every hierarchy, then
    into the daemon's own; v2 moves the daemon's pid through ``cgroup.procs``."""
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    files.enter()
    files.leave()
    files.close()
    driver.teardown()
    if tree.version == "v1":
        me = "0"  # the calling thread, to the kernel
        joined = len(driver.controllers)  # not cpu, pids: only jobs with such a limit
        for path in driver.paths(JOB)[:joined]:
            assert read(f"{path}/tasks") == me
        for root in driver.roots[:joined]:
            assert read(f"{os.path.dirname(root)}/tasks") == me
        for root in driver.roots[joined:]:
            assert read(f"{os.path.dirname(root)}/tasks") == ""
    else:
        [path] = driver.paths(JOB)
        assert read(f"{path}/cgroup.procs") == str(os.getpid())
        assert read(f"{tree.root}/sys/fs/cgroup/svc/cgroup.procs") == str(os.getpid())
        # The controllers were delegated to the subtree and its children.
        assert read(f"{driver.roots[0]}/cgroup.subtree_control") == "+memory +cpu +io +pids"


def test_usage_is_read_from_the_versions_files(tree: FakeCgroupTree) -> None:
    """cpu_seconds, memory_peak and io bytes come from cpuacct/memory/blkio (v1) or
    cpu.stat/memory.peak/io.stat (v2), summed over devices."""
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    paths = dict(zip(driver.controllers, driver.paths(JOB), strict=False))
    if tree.version == "v1":
        Path(paths["cpuacct"], "cpuacct.usage").write_text("2500000000\n")
        Path(paths["memory"], "memory.max_usage_in_bytes").write_text("1048576\n")
        Path(paths["blkio"], "blkio.throttle.io_service_bytes").write_text(
            "8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\n8:16 Read 100\n8:16 Write 0\n"
            "Total 4708\n")
    else:
        [path] = driver.paths(JOB)
        Path(path, "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
        Path(path, "memory.peak").write_text("1048576\n")
        Path(path, "io.stat").write_text("8:0 rbytes=4096 wbytes=512 rios=1 wios=1\n"
                                         "8:16 rbytes=100 wbytes=0 rios=1 wios=0\n")
    files = driver.open(JOB)
    assert files.usage() == {"cpu_seconds": 2.5, "memory_peak": 1048576,
                             "io_read_bytes": 4196, "io_write_bytes": 512}
    files.close()


def test_kill_all_freezes_on_v1_and_writes_cgroup_kill_on_v2(tree: FakeCgroupTree) -> None:
    """v1: FROZEN written to freezer.state, then SIGKILL to each listed pid; v2: one write
    of 1 to cgroup.kill and no signal from the daemon."""
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    for path in driver.paths(JOB)[:len(driver.controllers)]:
        Path(path, "cgroup.procs").write_text("101\n102\n")
    files = driver.open(JOB)
    sent: list[tuple[int, int]] = []
    if tree.version == "v1":
        assert files.freeze()
        freezer = driver.roots[driver.controllers.index("freezer")]
        assert read(f"{freezer}/{JOB}/freezer.state") == "FROZEN"
        assert files.frozen()
        assert files.kill_all(lambda pid, sig: sent.append((pid, sig))) == 2
        assert sent == [(101, signal.SIGKILL), (102, signal.SIGKILL)]
        files.thaw()
        assert read(f"{freezer}/{JOB}/freezer.state") == "THAWED"
    else:
        assert not files.freeze()
        files.kill_all(lambda pid, sig: sent.append((pid, sig)))
        assert sent == [] and read(f"{driver.roots[0]}/{JOB}/cgroup.kill") == "1"
    assert files.pids() == [101, 102]
    files.close()


def test_recycle_resets_counters_and_renames_on_v1_only(tree: FakeCgroupTree) -> None:
    """v1: an emptied cgroup is reused under a fresh id (a new memory cgroup, cpu and io
    counters reset, the other hierarchies renamed, files kept open); v2 refuses."""
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    if tree.version == "v2":
        with pytest.raises(OSError):
            files.recycle("fresh")
        return
    paths = dict(zip(driver.controllers, driver.paths(JOB), strict=False))
    Path(paths["cpuacct"], "cpuacct.usage").write_text("9999\n")
    files.recycle("fresh")
    assert driver.children() == ["fresh"] and files.name == "fresh"
    fresh = dict(zip(driver.controllers, driver.paths("fresh"), strict=False))
    assert read(f"{fresh['cpuacct']}/cpuacct.usage").startswith("0")
    # memory is made anew (what the last job left charged goes to the parent, no reclaim)
    assert read(f"{fresh['memory']}/memory.force_empty") == ""
    assert not os.path.exists(paths["memory"])
    assert read(f"{fresh['blkio']}/blkio.reset_stats") == "1"
    assert fresh["freezer"].endswith("/fresh")
    files.enter()  # the open tasks files followed the rename
    assert read(f"{fresh['freezer']}/tasks") == "0"  # the calling thread
    files.close()


def test_remove_is_refused_while_busy(tree: FakeCgroupTree) -> None:
    """A cgroup with a process stays (EBUSY); an empty one goes from every hierarchy."""
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    assert all(os.path.isdir(p) for p in driver.paths(JOB)[:len(driver.controllers)])
    assert driver.children() == [JOB]
    Path(driver.paths(JOB)[0], "cgroup.procs").write_text("77\n")
    with pytest.raises(OSError) as e:
        driver.remove(JOB)
    assert e.value.errno == errno.EBUSY
    Path(driver.paths(JOB)[0], "cgroup.procs").write_text("")
    driver.remove(JOB)
    assert not any(os.path.exists(p) for p in driver.paths(JOB))
    driver.teardown()
    assert not any(os.path.exists(r) for r in driver.roots)


# -- JobCgroup on a clock --------------------------------------------------------------------


def job_cgroup(clock: Clock, files: FakeCgroupFiles, atomic: bool = False
               ) -> tuple[JobCgroup, list[tuple[int, int]], list[str]]:
    sent: list[tuple[int, int]] = []
    released: list[str] = []

    def release(f: Any) -> None:
        released.append(f.name)
        f.close()

    cg = JobCgroup(clock, files, atomic_kill=atomic, on_release=release,
                   kill=lambda pid, sig: sent.append((pid, sig)))
    return cg, sent, released


def test_kill_waits_until_frozen_then_kills_each_and_thaws() -> None:
    """v1: the KILL goes out only once the freeze completed (no fork can slip through),
    and the cgroup is thawed right after so the KILLed tasks can die."""
    clock, files = Clock(), FakeCgroupFiles(JOB)
    files.procs = [5, 6]
    files.freezing = True
    cg, sent, _ = job_cgroup(clock, files)
    cg.kill()
    assert files.log == ["freeze"] and sent == []
    clock.advance(0.001)
    assert sent == []
    files.state = "FROZEN"
    clock.advance(0.001)
    assert files.log == ["freeze", "kill:FROZEN", "thaw"]
    assert sent == [(5, signal.SIGKILL), (6, signal.SIGKILL)]


def test_a_freeze_that_never_completes_still_kills_after_freeze_wait() -> None:
    """A task stuck in FREEZING (uninterruptible sleep) does not hold the KILL back for
    more than FREEZE_WAIT."""
    clock, files = Clock(), FakeCgroupFiles(JOB)
    files.procs = [5]
    files.freezing = True
    cg, sent, _ = job_cgroup(clock, files)
    cg.kill()
    clock.pump([0.001] * int(jobcgroup.FREEZE_WAIT / 0.001 + 5))
    assert files.log == ["freeze", "kill:FREEZING", "thaw"] and sent == [(5, 9)]


def test_when_empty_polls_and_repeats_the_kill_while_processes_remain() -> None:
    """Fires once cgroup.procs is empty; a KILL asked for is sent again every KILL_AGAIN
    while processes are left (a fork that raced the first one)."""
    clock, files = Clock(), FakeCgroupFiles(JOB)
    files.procs = [5]
    cg, sent, _ = job_cgroup(clock, files, atomic=True)
    cg.kill()
    d = cg.when_empty()
    assert not d.called and files.log == ["kill:THAWED"]
    clock.pump([0.05] * 20)  # 1 s: the first KILL, then one more after KILL_AGAIN
    assert files.log.count("kill:THAWED") == 2
    files.procs = []
    clock.advance(jobcgroup.MAX_POLL)
    assert fired(d) is None


def test_usage_is_read_at_most_once_per_ttl_and_finally_on_release() -> None:
    """A fresh cgroup reports zeros without a read; later reads are cached for USAGE_TTL;
    release reads the final figures, closes the files and hands the name back."""
    clock, files = Clock(), FakeCgroupFiles(JOB)
    cg, _, released = job_cgroup(clock, files)
    assert cg.usage() == jobcgroup.ZERO_USAGE and files.usage_reads == 0
    clock.advance(jobcgroup.USAGE_TTL)
    files.counted["cpu_seconds"] = 1.5
    assert cg.usage()["cpu_seconds"] == 1.5 and files.usage_reads == 1
    files.counted["cpu_seconds"] = 2.0
    assert cg.usage()["cpu_seconds"] == 1.5 and files.usage_reads == 1
    final = cg.release()
    assert final["cpu_seconds"] == 2.0 and files.closed and released == [JOB]
    assert cg.usage()["cpu_seconds"] == 2.0


# -- the Job's policy with a cgroup (fake reactor) ------------------------------------------


@pytest.fixture
def preactor() -> ProcessReactor:
    return ProcessReactor.at(T0)


@pytest.fixture
def cgroups(preactor: ProcessReactor) -> FakeCgroups:
    return FakeCgroups(preactor)


@pytest.fixture
def manager(preactor: ProcessReactor, cgroups: FakeCgroups, tmp_path: Path) -> JobManager:
    return JobManager(preactor, LogStore(str(tmp_path / "logs")), grace=GRACE,
                      killpg=preactor.killpg, cgroups=cgroups)


def test_the_spawn_happens_inside_the_jobs_cgroup(manager: JobManager, cgroups: FakeCgroups,
                                                   preactor: ProcessReactor) -> None:
    """The manager enters the job's cgroup right before spawning and leaves right after."""
    inside: list[bool] = []
    real_spawn = preactor.spawnProcess

    def spawn(*a: Any, **kw: Any) -> Any:
        inside.append(next(iter(cgroups.files.values())).inside)
        return real_spawn(*a, **kw)

    preactor.spawnProcess = spawn  # type: ignore[method-assign]
    job = manager.start("alice", "sleep", ["60"])
    files = cgroups.files[job.id]
    assert inside == [True] and files.log == ["enter", "leave"] and job.cgroup is not None
    assert job.record().usage == jobcgroup.ZERO_USAGE


def test_a_cgroup_that_cannot_be_made_fails_the_job(manager: JobManager,
                                                     cgroups: FakeCgroups,
                                                     preactor: ProcessReactor) -> None:
    """No job runs outside the cgroup it should have had: the start fails with why."""
    cgroups.error = OSError(errno.ENOSPC, "No space left on device")
    job = manager.start("alice", "sleep", ["60"])
    assert job.state == FAILED and "cannot make the job's cgroup" in (job.error or "")
    assert preactor.processes == []


def test_stop_signals_the_cgroup_and_replies_once_it_is_empty(
        manager: JobManager, cgroups: FakeCgroups, preactor: ProcessReactor) -> None:
    """TERM to every process in the cgroup (and the group); KILL through the freezer at
    the grace; the reply comes only once the cgroup is empty, with the final usage."""
    job = manager.start("alice", "sleep", ["60"])
    files = cgroups.files[job.id]
    assert job.pid is not None
    files.procs = [job.pid, 4001, 4002]  # a setsid child and a double-forked orphan
    d = manager.stop(job)
    assert sorted(cgroups.kills) == [(job.pid, 15), (4001, 15), (4002, 15)]
    preactor.advance(GRACE)
    assert files.log[-3:] == ["freeze", "kill:FROZEN", "thaw"]
    preactor.process(job.pid).kill(signal.SIGKILL)
    files.procs = [4001]  # the orphan is still dying
    assert job.state == STOPPED and not d.called
    files.counted["cpu_seconds"] = 0.25
    files.procs = []
    preactor.advance(jobcgroup.MAX_POLL)
    record = fired(d)
    assert record.state == STOPPED and record.usage["cpu_seconds"] == 0.25
    assert cgroups.released == [job.id] and job.cgroup is None and files.closed


def test_processes_left_by_an_exited_leader_are_ended_after_the_grace(
        manager: JobManager, cgroups: FakeCgroups, preactor: ProcessReactor,
        events: list[dict[str, Any]]) -> None:
    """A job is its whole cgroup: when the leader exits, what it left gets TERM, then the
    KILL at the grace; the job stays ``exited`` and is done once the cgroup is empty."""
    job = manager.start("alice", "sleep", ["60"])
    files = cgroups.files[job.id]
    done, ended = job.when_done(), job.when_ended()
    files.procs = [4001]
    files.counted["cpu_seconds"] = 0.25
    preactor.process(job.pid).exit(0)  # type: ignore[arg-type]
    assert job.state == EXITED and (4001, 15) in cgroups.kills and not done.called
    assert fired(ended).usage["cpu_seconds"] == 0.25  # as of the leader's end
    files.counted["cpu_seconds"] = 0.75
    assert named(events, "job.leftovers")[0]["count"] == 1
    preactor.advance(GRACE)
    assert (4001, 9) in cgroups.kills
    files.procs = []
    preactor.advance(jobcgroup.MAX_POLL)
    record = fired(done)
    assert record.state == EXITED and cgroups.released == [job.id]
    assert record.usage["cpu_seconds"] == 0.75  # final, once the rest has gone


def test_a_job_that_ends_alone_releases_its_cgroup_at_once(
        manager: JobManager, cgroups: FakeCgroups, preactor: ProcessReactor) -> None:
    """The usual case: nothing left behind, no timer, the cgroup goes back straight away;
    the ended record (what ``wait`` returns) already has the final usage, read as the
    job ended (not the figures cached up to USAGE_TTL before), and is encoded once."""
    job = manager.start("alice", "true", [])
    ended = job.when_ended()
    cgroups.files[job.id].counted["cpu_seconds"] = 0.5
    preactor.process(job.pid).exit(0)  # type: ignore[arg-type]
    assert job.done and cgroups.released == [job.id] and preactor.getDelayedCalls() == []
    assert fired(ended).usage["cpu_seconds"] == 0.5
    assert job.packed() is job.packed()
    assert fired(manager.stop(job)).usage["cpu_seconds"] == 0.5


def test_a_running_job_reports_usage_and_a_record_is_not_cached_before_done(
        manager: JobManager, cgroups: FakeCgroups, preactor: ProcessReactor) -> None:
    """status of a running job shows what its cgroup counted so far."""
    job = manager.start("alice", "sleep", ["60"])
    cgroups.files[job.id].counted["memory_peak"] = 4096
    preactor.advance(jobcgroup.USAGE_TTL)
    assert job.wire()["usage"]["memory_peak"] == 4096
    assert job.state == RUNNING


def test_shutdown_waits_for_every_jobs_cgroup_to_empty(
        manager: JobManager, cgroups: FakeCgroups, preactor: ProcessReactor) -> None:
    """stopService fires only once every job's cgroup is empty and released."""
    manager.startService()
    job = manager.start("alice", "sleep", ["60"])
    files = cgroups.files[job.id]
    files.procs = [job.pid, 4001]  # type: ignore[list-item]
    d = manager.stopService()
    preactor.process(job.pid).kill(signal.SIGTERM)  # type: ignore[arg-type]
    preactor.advance(GRACE)
    assert not d.called
    files.procs = []
    preactor.advance(jobcgroup.MAX_POLL)
    assert d.called and cgroups.released == [job.id]


# -- the pool on a fake tree ---------------------------------------------------------------


def in_thread(f: Any, *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


def test_pool_sweeps_our_leftovers_prepares_ids_and_removes_after_the_job(
        tmp_path: Path, preactor: ProcessReactor, events: list[dict[str, Any]]) -> None:
    """At start empty leftovers of an earlier daemon in our subtree go, a busy one stays
    (logged); cgroups are made ahead for ids new_id gives out, so take makes nothing; an
    id without one gets its cgroup made on the spot; a released cgroup is removed after
    the job, in a batch; stop removes the unused ones."""
    tree = FakeCgroupTree(str(tmp_path), "v1")
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create("old-job")
    driver.create("busy-job")
    Path(driver.paths("busy-job")[0], "cgroup.procs").write_text("999\n")
    pool = CgroupPool(preactor, driver, run_in_thread=in_thread, size=4, batch=4)
    pool.startService()
    assert named(events, "cgroups.enabled")[0]["version"] == "v1"
    assert named(events, "cgroups.leftovers")[0]["kept"] == ["busy-job"]
    ready = set(driver.children()) - {"busy-job"}
    assert len(ready) == 4 and pool.ready == 4
    job_id = pool.new_id()
    assert job_id in ready
    made = driver.children()
    cg = pool.take(job_id)  # type: ignore[arg-type]
    assert cg is not None and driver.children() == made  # nothing made now
    other = pool.take(JOB)
    assert other is not None and os.path.isdir(driver.paths(JOB)[0])
    assert pool.paths(JOB) == driver.paths(JOB)
    cpuacct = driver.paths(JOB)[driver.controllers.index("cpuacct")]
    Path(cpuacct, "cpuacct.usage").write_text("1500000000\n")
    before = pool.ready
    assert other.release()["cpu_seconds"] == 1.5  # read as it is handed back
    assert cg.release()["cpu_seconds"] == 0.0
    # Recycled or removed on the reactor thread at the end of the turn.
    assert JOB in driver.children() and job_id in driver.children()
    preactor.advance(0)
    assert JOB not in driver.children() and job_id not in driver.children()
    # v1: recycled as ready cgroups for new ids (counters reset) while there is room in
    # the pool (size 4); the rest removed.
    assert before == 3 and pool.ready == 4
    assert len(set(driver.children()) - {"busy-job"}) == 4
    assert all(read(f"{driver.roots[driver.controllers.index('cpuacct')]}/{n}/cpuacct.usage"
                    ).strip() == "0" for n in set(driver.children()) - {"busy-job"})
    fired(pool.stopService())
    # The spares went; an earlier daemon's busy cgroup (and so the subtree) stays.
    assert driver.children() == ["busy-job"]
    Path(driver.paths("busy-job")[0], "cgroup.procs").write_text("")
    driver.remove("busy-job")
    driver.teardown()
    assert not any(os.path.exists(r) for r in driver.roots)


def test_pool_recycles_at_most_per_turn_and_retries_a_busy_cgroup(
        tmp_path: Path, preactor: ProcessReactor, events: list[dict[str, Any]]) -> None:
    """Ends are handled on the reactor thread, PER_TURN a turn (a burst of ends does not
    hold the reactor); a cgroup still busy when removed is tried again after RETRY_AFTER."""
    from jobworker.jobs.cgpool import PER_TURN, RETRY_AFTER

    tree = FakeCgroupTree(str(tmp_path), "v1")
    driver = tree.detect("jw").driver
    assert driver is not None
    pool = CgroupPool(preactor, driver, run_in_thread=in_thread, size=2, batch=2)
    pool.startService()
    held = [pool.take(f"job-{i}") for i in range(PER_TURN + 3)]
    busy = pool.take("busy")
    assert all(held) and busy is not None
    Path(driver.paths("busy")[0], "cgroup.procs").write_text("4242\n")
    batches: list[int] = []
    remove = pool._remove  # noqa: SLF001

    def counted(driver: Any, batch: list[Any], recycle: int = 0) -> Any:
        batches.append(len(batch))
        return remove(driver, batch, recycle)

    pool._remove = counted  # type: ignore[method-assign]  # noqa: SLF001
    for cg in [*held, busy]:
        cg.release()  # type: ignore[union-attr]
    assert len(driver.children()) == PER_TURN + 4 + 2  # nothing yet (and the 2 spares)
    preactor.advance(0)  # (a Clock runs the next turn's call at once too)
    assert batches == [PER_TURN, 4]
    # The pool was full: removed, not recycled; the busy one is left for now.
    assert driver.children() == sorted(["busy", *pool_spares(pool)])
    Path(driver.paths("busy")[0], "cgroup.procs").write_text("")
    preactor.advance(RETRY_AFTER)
    assert "busy" not in driver.children() and not named(events, "cgroups.remove_failed")
    fired(pool.stopService())
    assert not any(os.path.exists(r) for r in driver.roots)


def test_an_adopted_cgroup_is_removed_whole_not_recycled(
        tmp_path: Path, preactor: ProcessReactor) -> None:
    """A restarted daemon adopts a running job's cgroup; the earlier daemon had given the
    job pids and cpu cgroups too (it had such limits), which the adopted files do not know
    of: once the job is over every one of them goes, none is left to a later sweep."""
    tree = FakeCgroupTree(str(tmp_path), "v1")
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    for root in driver.roots[len(driver.controllers):]:  # cpu, pids: made on demand
        tree.mkdir(f"{root}/{JOB}")
    for path in driver.paths(JOB):  # the job still runs: the start-up sweep keeps it
        Path(path, "cgroup.procs").write_text("4242\n")
    pool = CgroupPool(preactor, driver, run_in_thread=in_thread, size=4, batch=4)
    pool.startService()
    taken = pool.take(pool.new_id())  # type: ignore[arg-type]
    assert taken is not None and pool.ready == 3  # room in the pool: it would recycle
    adopted = pool.adopt(JOB)
    assert adopted is not None
    for path in driver.paths(JOB):
        Path(path, "cgroup.procs").write_text("")
    adopted.release()
    preactor.advance(0)
    assert not any(os.path.exists(p) for p in driver.paths(JOB))
    assert JOB not in driver.children()
    taken.release()
    fired(pool.stopService())


def pool_spares(pool: CgroupPool) -> list[str]:
    return list(pool._spares)  # noqa: SLF001 (which names are spares)


def test_pool_without_cgroups_logs_it_and_hands_out_none(
        preactor: ProcessReactor, events: list[dict[str, Any]]) -> None:
    """--no-cgroups (or a host without them): jobs run as before, and the log says so."""
    pool = CgroupPool(preactor, None, "--no-cgroups")
    pool.startService()
    [event] = named(events, "cgroups.disabled")
    assert event["reason"] == "--no-cgroups"
    assert pool.take(JOB) is None and pool.paths(JOB) == []


# -- real daemons on this host's cgroups ----------------------------------------------------


def _real_cgroups_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make cgroups"
    found = detect("jobworker-probe")
    if found.driver is None:
        return f"no cgroups here: {found.reason}"
    if not os.access(found.driver.roots[0].rsplit("/", 1)[0], os.W_OK):
        return "this process's cgroup is not writable"
    return None


_REASON = _real_cgroups_reason()
real = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def job_procs(d: Daemon, job_id: str) -> list[int] | None:
    """The pids in the job's cgroup (None once the cgroup is gone)."""
    for root in d.cgroup_roots():
        try:
            return [int(p) for p in read(f"{root}/{job_id}/cgroup.procs").split()]
        except FileNotFoundError:
            return None
        except OSError as e:  # ENODEV: removed while we read it
            if e.errno == errno.ENODEV:
                return None
            raise
    raise AssertionError("the daemon has no cgroup subtree")


def in_cgroup_anywhere(job_ids: set[str]) -> list[int]:
    """Every live process on the host whose cgroup path names one of ``job_ids``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = read(f"/proc/{entry}/cgroup")
        except OSError:
            continue
        if any(j in text for j in job_ids) and not dead(int(entry)):
            found.append(int(entry))
    return found


@real
def test_daemon_logs_cgroups_and_a_job_is_in_its_cgroup_before_exec(
        make_daemon: Any) -> None:
    """The job's own first read of /proc/self/cgroup already names its job id in every
    hierarchy the daemon uses: no instruction of the job runs outside its cgroup."""
    d = make_daemon()
    wait_for(lambda: re.search(r"cgroups\.enabled version=v[12]", d.log()), 10,
             what="cgroups.enabled in the log")
    job_id = d.jwclient("start", "--", "cat", "/proc/self/cgroup", check=True
                        ).stdout.decode().strip()
    d.jwclient("wait", job_id, check=True)
    from test_jobs_integration import log_bytes, record

    rec = record(d, job_id)
    lines = log_bytes(rec).decode().splitlines()
    roots = d.cgroup_roots()
    assert roots and len(roots) == len({r.split("/sys/fs/cgroup/")[1].split("/")[0]
                                        for r in roots})
    for root in roots:
        controller = root.split("/sys/fs/cgroup/")[1].split("/")[0]
        if controller in ("cpu", "pids"):
            continue  # joined only by jobs with such a limit
        line = next(ln for ln in lines if controller in ln.split(":")[1].split(","))
        assert line.endswith(f"/{d.cgroup_name}/{job_id}"), line
    assert set(rec["usage"]) == {"cpu_seconds", "memory_peak", "io_read_bytes",
                                 "io_write_bytes"}
    assert rec["usage"]["cpu_seconds"] > 0 and rec["usage"]["memory_peak"] > 0
    # Removed once the job ended (in a batch, shortly after).
    wait_for(lambda: job_procs(d, job_id) is None, 10, what="the job's cgroup to be removed")


def spawn_inside(files: Any) -> Any:
    """A child started with this thread (v2: process) inside ``files``' cgroup, as the
    daemon spawns: it spins a little (cpu time to count), then sleeps."""
    import subprocess

    files.enter()
    try:
        return subprocess.Popen(["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); "
                                 "done; exec sleep 60"])
    finally:
        files.leave()


@real
def test_pids_are_read_anew_each_time() -> None:
    """The driver on this host's cgroups: ``pids`` lists a child spawned inside, and
    nothing once it has gone (v1 keeps serving an open cgroup.procs from a cached pid
    list: it must be read afresh), and the usage counters move."""
    found = detect(f"jwtest-pids-{os.getpid()}")
    driver = found.driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    try:
        child = spawn_inside(files)
        assert files.pids() == [child.pid]
        assert files.pids() == [child.pid]
        wait_for(lambda: (files.usage()["cpu_seconds"] or 0) > 0, 10, what="cpu time")
        child.kill()
        child.wait()
        assert files.pids() == []
    finally:
        files.close()
        driver.remove(JOB)
        driver.teardown()


def _own_v2() -> str | None:
    """This process's cgroup in a mounted v2 hierarchy (controllers or not), if any."""
    members = read("/proc/self/cgroup").splitlines()
    path = next((ln.split(":", 2)[2] for ln in members if ln.startswith("0::")), None)
    if path is None:
        return None
    for line in read("/proc/self/mountinfo").splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2" and fields[3] == "/":
            return fields[4] + (path if path != "/" else "")
    return None


_OWN_V2 = _own_v2() if os.geteuid() == 0 else None


@pytest.mark.skipif(_OWN_V2 is None or not os.access(_OWN_V2 or "/", os.W_OK),
                    reason="no writable cgroup v2 hierarchy for this process")
def test_v2_driver_on_this_hosts_unified_tree() -> None:
    """The v2 driver on this host's unified hierarchy (here without controllers, as a
    hybrid host has it): the daemon moves itself in for a spawn and back, the child is
    listed through the descriptor held open (v2 starts the list over at offset 0), its
    cpu time is counted, cgroup.kill ends it and the list is then empty."""
    assert _OWN_V2 is not None
    driver = V2Driver(_OWN_V2, f"jwtest-v2-{os.getpid()}")
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    try:
        child = spawn_inside(files)
        assert str(os.getpid()) not in read(f"{driver.paths(JOB)[0]}/cgroup.procs").split()
        assert files.pids() == [child.pid] and files.pids() == [child.pid]
        wait_for(lambda: (files.usage()["cpu_seconds"] or 0) > 0, 10, what="cpu time")
        assert files.kill_all(os.kill) == -1  # cgroup.kill: no signal sent one by one
        assert child.wait(10) == -signal.SIGKILL
        wait_for(lambda: files.pids() == [], 10, what="the cgroup to empty")
    finally:
        files.close()
        driver.remove(JOB)
        driver.teardown()
    assert not os.path.exists(driver.roots[0])


@real
def test_no_cgroups_flag_runs_jobs_without_them(make_daemon: Any) -> None:
    """--no-cgroups: logged at start, jobs run, no usage, no subtree made."""
    d = make_daemon("--no-cgroups")
    wait_for(lambda: "cgroups.disabled" in d.log(), 10, what="cgroups.disabled in the log")
    job_id = d.jwclient("start", "--", "true", check=True).stdout.decode().strip()
    from test_jobs_integration import record

    d.jwclient("wait", job_id, check=True)
    assert record(d, job_id)["usage"] is None
    assert not any(os.path.exists(r) for r in
                   __import__("conftest").cgroup_dirs(d.pid, d.cgroup_name))


#: TERM is ignored everywhere, so only the cgroup KILL can end the tree: a setsid child,
#: a double-forked orphan (its parent exits at once), and a loop forking sleepers.
TREE = (
    "trap '' TERM; "
    "setsid sh -c 'trap \"\" TERM; exec sleep 300' & "
    "(sh -c 'trap \"\" TERM; exec sleep 300' &); "
    "sh -c 'trap \"\" TERM; while :; do sleep 300 & done' & "
    "exec sleep 300"
)


@real
@pytest_twisted.ensureDeferred
async def test_hundred_stops_of_a_forking_tree_leave_no_process(make_daemon: Any) -> None:
    """100 of 100 stops (grace 0.1 s) of a tree with a setsid child, a double-forked
    orphan and a fork loop leave 0 processes: the stop reply comes with the cgroup empty,
    and no process on the host is left in any of the job cgroups."""
    d = make_daemon("--grace", "0.1")
    client = await connect(real_reactor, d.config())
    ids: set[str] = set()
    began = time.monotonic()

    async def one() -> None:
        rec = await client.start("sh", ["-c", TREE])
        assert rec.state == RUNNING
        ids.add(rec.id)
        # The tree is up: leader, setsid child, orphan, loop and some of its sleepers.
        await until(lambda: len(job_procs(d, rec.id) or []) >= 6, 10, "the job tree")
        seen = job_procs(d, rec.id) or []
        stopped = await client.record("stop", rec.id, grace=0.1)
        assert stopped.state == STOPPED and stopped.signal == "SIGKILL"
        # The reply came once the cgroup was empty: nothing left in it now.
        assert not job_procs(d, rec.id)
        assert all(dead(pid) for pid in seen), [p for p in seen if not dead(p)]
        assert stopped.usage is not None and stopped.usage["cpu_seconds"] > 0

    for _ in range(10):
        await DeferredList([Deferred.fromCoroutine(one()) for _ in range(10)],
                           fireOnOneErrback=True, consumeErrors=True)
    assert len(ids) == 100
    assert in_cgroup_anywhere(ids) == []
    client.close()
    assert time.monotonic() - began < 30


def test_status_output_shows_usage_in_readable_units() -> None:
    """jwclient status renders the usage row; a figure the host cannot count shows as -."""
    from jobworker.client import render
    from jobworker.wire.record import JobRecord

    rec = JobRecord(id=JOB, pid=1, command="true", args=[], dir="/", owner="alice",
                    state=EXITED, exit_code=0, signal=None, error=None,
                    started_at="2026-11-18T11:06:40.250000Z",
                    ended_at="2026-11-18T11:06:41.250000Z", log_dir="/l",
                    usage={"cpu_seconds": 1.25, "memory_peak": 3 * 1024 * 1024,
                           "io_read_bytes": 512, "io_write_bytes": None})
    text = render.record(rec, T0, tty=False)
    assert "usage:   cpu 1.25s, memory peak 3.0 MiB, io read 512 B, written -\n" in text
    assert "usage" not in render.record(JobRecord.from_wire(
        {**rec.to_wire(), "usage": None}), T0, tty=False)


def test_a_cgroup_that_never_empties_still_gets_the_stop_answered(
        manager: JobManager, cgroups: FakeCgroups, preactor: ProcessReactor,
        events: list[dict[str, Any]]) -> None:
    """A process that survives its KILL (uninterruptible sleep) holds the stop reply back
    for STUCK_AFTER at most; the cgroup stays watched and is released once it empties."""
    from jobworker.jobs.job import STUCK_AFTER

    job = manager.start("alice", "sleep", ["60"])
    files = cgroups.files[job.id]
    files.procs = [4001]
    d = manager.stop(job)
    preactor.process(job.pid).kill(signal.SIGTERM)  # type: ignore[arg-type]
    preactor.advance(GRACE)
    assert not d.called
    preactor.pump([1.0] * int(STUCK_AFTER))
    assert fired(d).state == STOPPED and named(events, "job.cgroup_stuck")
    assert cgroups.released == []
    files.procs = []
    preactor.advance(jobcgroup.MAX_POLL)
    assert cgroups.released == [job.id] and job.done


def test_pool_stop_waits_for_jobs_still_holding_a_cgroup(
        tmp_path: Path, preactor: ProcessReactor) -> None:
    """MultiService stops the pool together with the job manager: the pool keeps removing
    released cgroups (and firing their final usage) until every job has handed its cgroup
    back, then removes the rest and the subtree."""
    tree = FakeCgroupTree(str(tmp_path), "v1")
    driver = tree.detect("jw").driver
    assert driver is not None
    pool = CgroupPool(preactor, driver, run_in_thread=in_thread, size=2, batch=2)
    pool.startService()
    held = pool.take(JOB)
    assert held is not None
    stopped = pool.stopService()
    assert not stopped.called
    usage = held.release()  # the job ended while the daemon stops
    assert usage["cpu_seconds"] == 0.0
    preactor.advance(0)
    assert stopped.called and not any(os.path.exists(r) for r in driver.roots)


def test_pool_stop_gives_up_on_a_cgroup_never_released(
        tmp_path: Path, preactor: ProcessReactor, events: list[dict[str, Any]]) -> None:
    """A job that never hands its cgroup back holds the stop for DRAIN_WAIT at most."""
    from jobworker.jobs.cgpool import DRAIN_WAIT

    tree = FakeCgroupTree(str(tmp_path), "v1")
    driver = tree.detect("jw").driver
    assert driver is not None
    pool = CgroupPool(preactor, driver, run_in_thread=in_thread, size=2, batch=2)
    pool.startService()
    assert pool.take(JOB) is not None
    Path(driver.paths(JOB)[0], "cgroup.procs").write_text("4242\n")
    stopped = pool.stopService()
    preactor.advance(DRAIN_WAIT)
    assert stopped.called and named(events, "cgroups.still_held")[0]["names"] == [JOB]
    assert driver.children() == [JOB]  # busy: left for the next start-up sweep
