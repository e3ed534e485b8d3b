"""Resource limits on start: the policy (defaults, maxima), the options and sizes, the
drivers' files on a fake tree, OOM handling on a fake clock, and real jobs under real limits."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import dead, until
from test_cgroups import (
    GRACE,
    T0,
    fired,
    in_cgroup_anywhere,
    job_procs,
    named,
    read,
    real,
)
from twisted.internet import reactor as real_reactor
from twisted.python import usage

from jobworker.client.api import connect
from jobworker.daemon.tap import Options
from jobworker.jobs import jobcgroup
from jobworker.jobs.joblimits import JobLimits, LimitPolicy
from jobworker.jobs.logs import LogStore
from jobworker.jobs.manager import JobManager
from jobworker.testing import FakeCgroups, FakeCgroupTree, ProcessReactor
from jobworker.wire import errors
from jobworker.wire.record import EXITED, FAILED, STOPPED
from jobworker.wire.sizes import parse_size

MiB = 1 << 20
JOB = "6a1d5b0e-2f3c-4d5e-8f90-a1b2c3d4e5f6"


# -- sizes, policy, options -----------------------------------------------------------------


def test_sizes_are_powers_of_1024() -> None:
    """512M, 1G, 1.5K, 2T and plain bytes; nonsense and non-positive sizes refused."""
    assert parse_size("512M") == 512 * MiB and parse_size("1G") == 1 << 30
    assert parse_size("1.5K") == 1536 and parse_size("2T") == 2 << 40
    assert parse_size("100MiB") == 100 * MiB and parse_size("4096") == 4096
    for bad in ("", "M", "x", "0", "-1M", "5Q"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_policy_applies_defaults_and_refuses_above_the_maximum_naming_it() -> None:
    """No request: the default (or else the maximum); above the maximum: bad_request
    that names it; at or below: as asked."""
    policy = LimitPolicy(JobLimits(memory=64 * MiB), JobLimits(memory=512 * MiB, pids=100))
    assert policy.resolve() == JobLimits(memory=64 * MiB, pids=100)
    assert policy.resolve(memory=512 * MiB, cpu=0.5) == JobLimits(512 * MiB, 0.5, 100)
    with pytest.raises(errors.BadRequest, match="maximum of 536870912 bytes"):
        policy.resolve(memory=512 * MiB + 1)
    with pytest.raises(errors.BadRequest, match="'pids' is above .* maximum of 100"):
        policy.resolve(pids=101)
    assert not LimitPolicy().resolve()
    with pytest.raises(ValueError):
        LimitPolicy(JobLimits(pids=10), JobLimits(pids=5))


def test_daemon_limit_options() -> None:
    """--default-memory/--max-memory take sizes; a default above the maximum, a bad size,
    or limits with --no-cgroups are usage errors."""
    opts = Options()
    opts.parseOptions(["--pki", "/p", "--default-memory", "256M", "--max-memory", "1G",
                       "--max-cpu", "2", "--default-pids", "64"])
    assert opts["limits"] == LimitPolicy(JobLimits(256 * MiB, None, 64),
                                         JobLimits(1 << 30, 2.0, None))
    for argv in (["--default-memory", "2G", "--max-memory", "1G"], ["--max-memory", "lots"],
                 ["--max-pids", "0"], ["--max-cpu", "0"], ["--no-cgroups", "--max-pids", "5"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(["--pki", "/p", *argv])


# -- the drivers' files ---------------------------------------------------------------------


@pytest.fixture(params=["v1", "v2"])
def tree(request: pytest.FixtureRequest, tmp_path: Path) -> FakeCgroupTree:
    """A fake cgroup file system of either version (the test id says which ran)."""
    return FakeCgroupTree(str(tmp_path), request.param)


def test_limits_are_written_to_the_versions_files(tree: FakeCgroupTree) -> None:
    """v1: memory.limit_in_bytes, and pids and cpu cgroups made for this job only with
    pids.max and cfs_quota/period (which the spawning thread then enters and leaves); v2:
    memory.max, cpu.max, pids.max.  OOM kills: memory.oom_control / memory.events."""
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    files.set_limits(100 * MiB, 0.25, 20)
    if tree.version == "v1":
        by = {p.split("/sys/fs/cgroup/")[1].split("/")[0]: p for p in driver.paths(JOB)}
        assert read(f"{by['memory']}/memory.limit_in_bytes") == str(100 * MiB)
        assert read(f"{by['pids']}/pids.max") == "20"
        assert read(f"{by['cpu']}/cpu.cfs_quota_us") == "25000"
        assert read(f"{by['cpu']}/cpu.cfs_period_us") == "100000"
        files.enter()
        files.leave()
        for c in ("cpu", "pids"):
            home = next(r for r in driver.roots if f"/{c}/" in r)
            assert read(f"{by[c]}/tasks") == read(f"{os.path.dirname(home)}/tasks") != ""
        Path(by["memory"], "memory.oom_control").write_text(
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        assert files.oom_kills() == 2
        files.recycle("fresh")  # limits off again, the cpu cgroup gone
        fresh = {p.split("/sys/fs/cgroup/")[1].split("/")[0]: p for p in driver.paths("fresh")}
        assert read(f"{fresh['memory']}/memory.limit_in_bytes").strip() == "9223372036854771712"
        for c in ("cpu", "pids"):  # joined for those limits only: gone with them
            assert not os.path.exists(fresh[c]) and not os.path.exists(by[c])
    else:
        [path] = driver.paths(JOB)
        assert read(f"{path}/memory.max") == str(100 * MiB)
        assert read(f"{path}/cpu.max") == "25000 100000"
        assert read(f"{path}/pids.max") == "20"
        Path(path, "memory.events").write_text("oom 3\noom_kill 1\n")
        assert files.oom_kills() == 1
    files.close()


# -- the manager and the job (fake reactor) -------------------------------------------------


@pytest.fixture
def preactor() -> ProcessReactor:
    return ProcessReactor.at(T0)


def manager_with(preactor: ProcessReactor, tmp_path: Path, cgroups: FakeCgroups | None,
                 policy: LimitPolicy) -> JobManager:
    return JobManager(preactor, LogStore(str(tmp_path / "logs")), grace=GRACE,
                      killpg=preactor.killpg, cgroups=cgroups, limits=policy)


def test_limits_are_set_before_the_spawn_and_recorded(preactor: ProcessReactor,
                                                      tmp_path: Path) -> None:
    """The job's cgroup gets its limits before the thread enters it; the record says
    which limits apply (the default filled in)."""
    cgroups = FakeCgroups(preactor)
    manager = manager_with(preactor, tmp_path, cgroups, LimitPolicy(JobLimits(pids=64)))
    job = manager.start("alice", "sleep", ["60"], memory=100 * MiB, cpu=0.5)
    files = cgroups.files[job.id]
    assert files.log[:3] == [f"limits:{100 * MiB},0.5,64", "enter", "leave"]
    assert job.record().limits == {"memory": 100 * MiB, "cpu": 0.5, "pids": 64}


def test_above_the_maximum_is_refused_and_without_cgroups_limits_fail(
        preactor: ProcessReactor, tmp_path: Path) -> None:
    """A request above a maximum raises bad_request (no job); limits on a daemon without
    cgroups give a failed job saying why."""
    policy = LimitPolicy(maxima=JobLimits(memory=64 * MiB))
    manager = manager_with(preactor, tmp_path, FakeCgroups(preactor), policy)
    with pytest.raises(errors.BadRequest, match="maximum of 67108864"):
        manager.start("alice", "sleep", ["60"], memory=65 * MiB)
    assert manager.jobs() == []
    bare = manager_with(preactor, tmp_path, None, LimitPolicy())
    job = bare.start("alice", "sleep", ["60"], pids=5)
    assert job.state == FAILED and "need cgroups" in (job.error or "")


def test_an_oom_kill_ends_the_rest_of_the_job_and_is_recorded(
        preactor: ProcessReactor, tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """The kernel OOM-kills a child: within OOM_POLL the daemon KILLs the rest of the job
    (freezer), the record says oom_killed, and the state is the leader's (exited, KILL)."""
    cgroups = FakeCgroups(preactor)
    manager = manager_with(preactor, tmp_path, cgroups, LimitPolicy())
    job = manager.start("alice", "sleep", ["60"], memory=100 * MiB)
    files = cgroups.files[job.id]
    files.procs = [job.pid, 4001]  # type: ignore[list-item]
    preactor.advance(jobcgroup.OOM_POLL)
    assert not job.oom_killed
    files.ooms = 1
    preactor.advance(jobcgroup.OOM_POLL)
    assert job.oom_killed and named(events, "job.oom_killed")
    assert files.log[-3:] == ["freeze", "kill:FROZEN", "thaw"]
    preactor.process(job.pid).kill(signal.SIGKILL)  # type: ignore[arg-type]
    files.procs = []
    preactor.advance(jobcgroup.MAX_POLL)
    record = fired(job.when_done())
    assert record.state == EXITED and record.signal == "SIGKILL" and record.oom_killed


# -- real jobs under real limits -------------------------------------------------------------


PY = sys.executable


@real
def test_300_mb_under_a_100m_limit_is_oom_killed(make_daemon: Any) -> None:
    """A job touching 300 MiB under --memory 100M is killed by the kernel; its record
    says oom_killed, and its memory peak stayed at the limit."""
    d = make_daemon()
    out = d.jwclient("--json", "start", "--memory", "100M", "--", PY, "-c",
                     "x = b'\\x01' * (300 * 1024 * 1024); print(len(x))", check=True)
    job_id = json.loads(out.stdout)["id"]
    rec = json.loads(d.jwclient("--json", "wait", job_id).stdout)
    assert rec["oom_killed"] is True and rec["signal"] == "SIGKILL", rec
    assert rec["limits"]["memory"] == 100 * MiB
    assert 0 < rec["usage"]["memory_peak"] <= 100 * MiB + MiB


@real
@pytest_twisted.ensureDeferred
async def test_a_fork_loop_under_pids_20_is_contained_and_stopped(make_daemon: Any) -> None:
    """Under --pids 20 a fork loop never has more than 20 processes (forks fail past it,
    pids.events counts them) and a stop still leaves none."""
    d = make_daemon("--grace", "0.2")
    client = await connect(real_reactor, d.config())
    loop = ("import os, time\n"
            "while True:\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "    except OSError:\n"
            "        pass\n")
    rec = await client.start(PY, ["-c", loop], pids=20)
    assert rec.limits == {"memory": None, "cpu": None, "pids": 20}
    pids_root = next(r for r in d.cgroup_roots() if "/sys/fs/cgroup/pids/" in r)
    events = f"{pids_root}/{rec.id}/pids.events"
    await until(lambda: int(read(events).split()[1]) > 0, 10, "forks refused at the limit")
    for _ in range(20):
        assert len(job_procs(d, rec.id) or []) <= 20
    seen = job_procs(d, rec.id) or []
    stopped = await client.record("stop", rec.id, grace=0.2)
    assert stopped.state == STOPPED and not job_procs(d, rec.id)
    assert all(dead(pid) for pid in seen) and in_cgroup_anywhere({rec.id}) == []
    client.close()


@real
@pytest_twisted.ensureDeferred
async def test_a_busy_loop_under_cpu_0_2_uses_a_fifth_of_a_core(make_daemon: Any) -> None:
    """A busy loop under --cpu 0.2 uses 0.2 +- 0.1 cores, measured by its cgroup over 3 s."""
    d = make_daemon("--grace", "0.2")
    client = await connect(real_reactor, d.config())
    rec = await client.start(PY, ["-c", "while True: pass"], cpu=0.2)
    cpuacct = next(r for r in d.cgroup_roots() if "/sys/fs/cgroup/cpuacct/" in r)
    usage_file = f"{cpuacct}/{rec.id}/cpuacct.usage"
    assert read(f"{next(r for r in d.cgroup_roots() if '/cpu/' in r)}/{rec.id}/"
                "cpu.cfs_quota_us").strip() == "20000"
    await until(lambda: int(read(usage_file)) > 0, 10, "the loop to run")
    began, used = time.monotonic(), int(read(usage_file))
    await until(lambda: time.monotonic() - began >= 3.0, 10, "3 s of the loop")
    cores = (int(read(usage_file)) - used) / 1e9 / (time.monotonic() - began)
    await client.record("stop", rec.id, grace=0.2)
    client.close()
    assert 0.1 <= cores <= 0.3, cores


@real
def test_a_start_above_the_daemons_maximum_is_refused(make_daemon: Any) -> None:
    """jwclient start --memory above --max-memory: bad_request naming the maximum."""
    d = make_daemon("--max-memory", "64M")
    result = d.jwclient("start", "--memory", "1G", "--", "true")
    assert result.returncode != 0
    assert b"maximum of 67108864 bytes" in result.stderr, result.stderr
    ok = d.jwclient("--json", "start", "--", "true", check=True)
    assert json.loads(ok.stdout)["limits"]["memory"] == 64 * MiB


def test_the_default_cgroup_subtree_is_named_after_the_state_directory() -> None:
    """Same state directory, same subtree (a restarted daemon finds its jobs' cgroups);
    another state directory, another subtree."""
    from jobworker.daemon.tap import default_cgroup_root_name

    one = Options()
    one.parseOptions(["--pki", "/p", "--state-dir", "/srv/jw/state"])
    assert one["cgroup-root-name"] == default_cgroup_root_name("/srv/jw/state")
    assert one["cgroup-root-name"].startswith("jobworker-") and len(one["cgroup-root-name"]) == 18
    assert default_cgroup_root_name("/srv/jw/other") != one["cgroup-root-name"]
    named_opts = Options()
    named_opts.parseOptions(["--pki", "/p", "--cgroup-root-name", "jw-a"])
    assert named_opts["cgroup-root-name"] == "jw-a"
