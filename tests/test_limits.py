"""Resource limits on start: the policy (defaults, maxima), the options and sizes, the
drivers' files on a fake tree, OOM handling on a fake clock, and real jobs under real limits."""

from __future__ import annotations

import json
import os
import re
import select
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
from jobworker.jobs.blockdev import BlockDevices
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
    io = LimitPolicy(JobLimits(io_write=MiB), JobLimits(io_read=10 * MiB))
    assert io.resolve(io_read=MiB) == JobLimits(io_read=MiB, io_write=MiB)
    with pytest.raises(errors.BadRequest, match="'io_read' is above .* 10485760 bytes per second"):
        io.resolve(io_read=11 * MiB)
    with pytest.raises(ValueError):
        LimitPolicy(JobLimits(pids=10), JobLimits(pids=5))


def test_daemon_limit_options() -> None:
    """--default-memory/--max-memory take sizes; a default above the maximum, a bad size,
    or limits with --no-cgroups are usage errors."""
    opts = Options()
    opts.parseOptions(["--pki", "/p", "--default-memory", "256M", "--max-memory", "1G",
                       "--max-cpu", "2", "--default-pids", "64", "--default-io-read", "10M",
                       "--max-io-read", "1G", "--max-io-write", "512K"])
    assert opts["limits"] == LimitPolicy(JobLimits(256 * MiB, None, 64, 10 * MiB, None),
                                         JobLimits(1 << 30, 2.0, None, 1 << 30, 512 << 10))
    for argv in (["--default-memory", "2G", "--max-memory", "1G"], ["--max-memory", "lots"],
                 ["--default-io-write", "2M", "--max-io-write", "1M"], ["--max-io-read", "0"],
                 ["--no-cgroups", "--default-io-read", "1M"],
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
        assert read(f"{by['cpu']}/cpu.cfs_period_us").strip() == "100000"  # as made
        files.enter()
        files.leave()
        for c in ("cpu", "pids"):
            home = next(r for r in driver.roots if f"/{c}/" in r)
            assert read(f"{by[c]}/tasks") == read(f"{os.path.dirname(home)}/tasks") != ""
        Path(by["memory"], "memory.oom_control").write_text(
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        assert files.oom_kills() == 2
        files.recycle("fresh")  # limits off again, the cpu and pids cgroups kept unjoined
        fresh = {p.split("/sys/fs/cgroup/")[1].split("/")[0]: p for p in driver.paths("fresh")}
        assert read(f"{fresh['memory']}/memory.limit_in_bytes").strip() == "9223372036854771712"
        assert read(f"{fresh['pids']}/pids.max") == "max"
        assert read(f"{fresh['cpu']}/cpu.cfs_quota_us") == "-1"
        for c in ("cpu", "pids"):  # renamed with the rest, not left behind
            assert not os.path.exists(by[c])
        written = [read(f"{fresh[c]}/tasks") for c in ("cpu", "pids", "memory")]
        files.enter()  # a job without those limits does not join them (the fake's tasks
        # files keep what was written: the cpu and pids ones hold the first job's entry)
        assert [read(f"{fresh[c]}/tasks") for c in ("cpu", "pids")] == written[:2]
        assert read(f"{fresh['memory']}/tasks") != written[2]
    else:
        [path] = driver.paths(JOB)
        assert read(f"{path}/memory.max") == str(100 * MiB)
        assert read(f"{path}/cpu.max") == "25000 100000"
        assert read(f"{path}/pids.max") == "20"
        Path(path, "memory.events").write_text("oom 3\noom_kill 1\n")
        assert files.oom_kills() == 1
    files.close()


def test_a_recycled_v1_cgroup_keeps_its_cpu_and_pids_cgroups_for_the_next_limited_job(
        tmp_path: Path) -> None:
    """A job with cpu and pids limits leaves those cgroups, limits lifted, renamed with
    the rest when its cgroup is recycled: the next job with such limits joins them as they
    are (no mkdir on the start path), and its limits land there."""
    driver = FakeCgroupTree(str(tmp_path), "v1").detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    for name, (cpu, pids) in ((JOB, (0.25, 20)), ("fresh", (2.0, 5))):
        by = {p.split("/sys/fs/cgroup/")[1].split("/")[0]: p for p in driver.paths(name)}
        if name == "fresh":
            files.recycle(name)
            assert read(f"{by['pids']}/pids.max") == "max"  # kept, lifted
            assert read(f"{by['cpu']}/cpu.cfs_quota_us") == "-1"
        files.set_limits(None, cpu, pids)
        assert read(f"{by['pids']}/pids.max") == str(pids)
        assert read(f"{by['cpu']}/cpu.cfs_quota_us") == str(int(cpu * 100_000))
    files.close()


def test_v2_oom_notifier_is_inotify_on_memory_events(tmp_path: Path) -> None:
    """v2 (fake tree, as this host is v1): the descriptor watched for OOMs becomes readable
    when memory.events changes, and is drained by a read."""
    driver = FakeCgroupTree(str(tmp_path), "v2").detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    fd = files.oom_notifier()
    assert fd is not None
    try:
        assert select.select([fd], [], [], 0)[0] == []
        Path(driver.paths(JOB)[0], "memory.events").write_text("oom 1\noom_kill 1\n")
        assert select.select([fd], [], [], 5)[0] == [fd]
        os.read(fd, 4096)
        assert select.select([fd], [], [], 0)[0] == []
        assert files.oom_kills() == 1
    finally:
        os.close(fd)
        files.close()


def test_io_limits_are_written_to_the_versions_files(tree: FakeCgroupTree) -> None:
    """v1: one "MAJ:MIN bytes" rule per disk in blkio.throttle.read_bps_device and
    write_bps_device, lifted ("MAJ:MIN 0") when the cgroup is recycled for the next job;
    v2: io.max "MAJ:MIN rbps=... wbps=..." ("max" for the one not limited)."""
    driver = tree.detect("jw").driver
    assert driver is not None
    driver.setup()
    driver.create(JOB)
    files = driver.open(JOB)
    if tree.version == "v1":
        blkio = next(p for p in driver.paths(JOB) if "/blkio/" in p)
        files.set_io(["254:0"], MiB, 2 * MiB)
        assert read(f"{blkio}/blkio.throttle.read_bps_device") == f"254:0 {MiB}"
        assert read(f"{blkio}/blkio.throttle.write_bps_device") == f"254:0 {2 * MiB}"
        files.recycle("fresh")
        blkio = next(p for p in driver.paths("fresh") if "/blkio/" in p)
        for name in ("read", "write"):
            assert read(f"{blkio}/blkio.throttle.{name}_bps_device") == "254:0 0"
    else:
        [path] = driver.paths(JOB)
        files.set_io(["254:0"], MiB, None)
        assert read(f"{path}/io.max") == f"254:0 rbps={MiB} wbps=max"
        files.set_io(["8:16"], None, 3 * MiB)
        assert read(f"{path}/io.max") == f"8:16 rbps=max wbps={3 * MiB}"
    files.close()


def test_a_partition_is_throttled_through_its_whole_disk(tmp_path: Path) -> None:
    """The kernel's throttles take whole disks only (a partition is ENODEV): a partition's
    sysfs entry resolves to its disk's MAJ:MIN, a disk to itself, anonymous devices and
    unknown ones to None."""
    disk = tmp_path / "devices/pci0/block/sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (disk / "sda1" / "partition").write_text("1\n")
    (tmp_path / "dev/block").mkdir(parents=True)
    os.symlink(disk, tmp_path / "dev/block/8:0")
    os.symlink(disk / "sda1", tmp_path / "dev/block/8:1")
    devices = BlockDevices(str(tmp_path))
    assert devices.whole_disk(8, 1) == "8:0" and devices.whole_disk(8, 0) == "8:0"
    assert devices.whole_disk(0, 45) is None and devices.whole_disk(8, 2) is None


def test_the_state_directorys_disk_is_a_whole_disk_and_tmpfs_none(tmp_path: Path) -> None:
    """On this host: the disk holding a test directory is one /sys/block lists (a whole
    disk, not a partition); /dev/shm (tmpfs) is on no block device."""
    devices = BlockDevices()
    disk = devices.disk_of(str(tmp_path))
    if disk is None:
        pytest.skip(f"{tmp_path} is on no block device here")
    names = {Path(f"/sys/block/{n}/dev").read_text().strip(): n for n in os.listdir("/sys/block")}
    assert disk in names, (disk, names)
    assert devices.disks_of([str(tmp_path), str(tmp_path), "/dev/shm"]) == [disk]


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
    assert job.record().limits == {"memory": 100 * MiB, "cpu": 0.5, "pids": 64,
                                   "io_read": None, "io_write": None}


def test_io_limits_apply_to_the_disks_of_the_job_dir_and_the_logs(
        preactor: ProcessReactor, tmp_path: Path) -> None:
    """An io limit is set on the disks of the job's directory and of the state directory
    (each once), after the other limits and before the spawn; the record names them."""
    cgroups = FakeCgroups(preactor)
    manager = manager_with(preactor, tmp_path, cgroups, LimitPolicy(JobLimits(io_write=MiB)))
    job = manager.start("alice", "sleep", ["60"], dir=str(tmp_path), io_read=2 * MiB)
    disks = BlockDevices().disks_of([str(tmp_path), str(tmp_path / "logs")])
    files = cgroups.files[job.id]
    assert files.log[:4] == ["limits:None,None,None", f"io:{','.join(disks)},{2 * MiB},{MiB}",
                             "enter", "leave"]
    assert job.record().limits == {"memory": None, "cpu": None, "pids": None,
                                   "io_read": 2 * MiB, "io_write": MiB, "io_devices": disks}


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


def test_after_oom_poll_an_oom_is_seen_on_the_kernels_notification(
        preactor: ProcessReactor, tmp_path: Path, events: list[dict[str, Any]]) -> None:
    """A limited job still running at OOM_POLL gets its cgroup's OOM eventfd watched on the
    reactor instead of more polls: a notification whose kill is counted ends the job at
    once (no time passes); one that comes before its kill is counted is looked at again
    OOM_SETTLE later; either way the eventfd is then unwatched and closed."""
    cgroups = FakeCgroups(preactor)
    manager = manager_with(preactor, tmp_path, cgroups, LimitPolicy())
    jobs = [manager.start("alice", "sleep", ["60"], memory=100 * MiB) for _ in range(2)]
    fds = []
    for job in jobs:
        files = cgroups.files[job.id]
        files.procs = [job.pid, 4001]  # type: ignore[list-item]
        files.oom_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(files.oom_fd)
    preactor.advance(jobcgroup.OOM_POLL)
    readers = {r.fileno(): r for r in preactor.getReaders()}
    assert set(fds) <= set(readers) and not any(j.oom_killed for j in jobs)
    first, second = (cgroups.files[j.id] for j in jobs)
    first.ooms = 1  # counted by the time the notification is read
    os.eventfd_write(fds[0], 1)
    readers[fds[0]].doRead()
    assert jobs[0].oom_killed and first.log[-3:] == ["freeze", "kill:FROZEN", "thaw"]
    os.eventfd_write(fds[1], 1)
    readers[fds[1]].doRead()  # the kill not counted yet
    assert not jobs[1].oom_killed
    second.ooms = 1
    preactor.advance(jobcgroup.OOM_SETTLE[1])
    assert jobs[1].oom_killed
    assert [e["via"] for e in named(events, "cgroup.oom_seen")] == ["event", "event"]
    assert not set(fds) & {r.fileno() for r in preactor.getReaders()}
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed


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
async def test_a_later_oom_is_seen_through_the_cgroups_eventfd(make_daemon: Any) -> None:
    """A job that runs past OOM_POLL, then allocates 300 MiB under a 100M limit beside a
    sleeping sibling: the kernel's v1 OOM notification (an eventfd) tells the daemon, which
    ends the sibling too; the record says oom_killed."""
    d = make_daemon("--grace", "0.2")
    client = await connect(real_reactor, d.config())
    script = ("import subprocess, time\n"
              "subprocess.Popen(['sleep', '60'])\n"
              "time.sleep(0.6)\n"
              "x = b'\\x01' * (300 * 1024 * 1024)\n")
    rec = await client.start(PY, ["-c", script], memory=100 * MiB)
    ended = await client.record("wait", rec.id)
    client.close()
    assert ended.oom_killed and ended.signal == "SIGKILL", ended
    await until(lambda: f"cgroup={rec.id} via=event" in d.log(), 10, "the oom event logged")
    assert not job_procs(d, rec.id)


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
    assert rec.limits == {"memory": None, "cpu": None, "pids": 20, "io_read": None,
                          "io_write": None}
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


def dd_rate(rec: Any) -> tuple[int, float]:
    """Bytes dd copied and its own rate of them, bytes per second, from the job's stderr."""
    text = Path(rec.log_dir, "stderr.log").read_text()
    found = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", text, re.MULTILINE)
    assert found, text
    return int(found[1]), int(found[1]) / float(found[2])


@real
@pytest_twisted.ensureDeferred
async def test_direct_io_is_throttled_to_the_io_limits_and_counted(make_daemon: Any,
                                                                   tmp_path: Path) -> None:
    """Under --io-read 1M a job reading 2 MiB with O_DIRECT, and under --io-write 1M one
    writing 2 MiB with O_DIRECT, each go at about 1 MiB/s by dd's own clock (unlimited:
    far faster); usage counts the bytes read and written; limits names the disk; above
    --max-io-read is refused, naming the maximum."""
    d = make_daemon("--grace", "0.2", "--max-io-read", "10M")
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.write(os.urandom(2 * MiB))
        os.fsync(f.fileno())  # no dirty pages for the direct read to write back first
    client = await connect(real_reactor, d.config())
    reader = await client.start("dd", [f"if={data}", "of=/dev/null", "bs=64k", "iflag=direct"],
                                dir=str(tmp_path), io_read=MiB)
    writer = await client.start("dd", ["if=/dev/zero", f"of={tmp_path / 'out'}", "bs=64k",
                                       "count=32", "oflag=direct"],
                                dir=str(tmp_path), io_write=MiB)
    with pytest.raises(errors.BadRequest, match="maximum of 10485760 bytes per second"):
        await client.start("true", io_read=20 * MiB)
    read_rec = await client.record("wait", reader.id)
    write_rec = await client.record("wait", writer.id)
    client.close()
    disk = BlockDevices().disk_of(str(tmp_path))
    assert read_rec.limits["io_read"] == MiB and read_rec.limits["io_devices"] == [disk]
    # No io_read asked for: the maximum applies.
    assert write_rec.limits["io_write"] == MiB and write_rec.limits["io_read"] == 10 * MiB
    for rec, counted in ((read_rec, "io_read_bytes"), (write_rec, "io_write_bytes")):
        assert rec.exit_code == 0, rec
        copied, rate = dd_rate(rec)
        assert copied == 2 * MiB and 0.3 * MiB <= rate <= 1.25 * MiB, (rec.command, rate)
        assert rec.usage[counted] >= 2 * MiB, rec.usage


@real
def test_a_start_above_the_daemons_maximum_is_refused(make_daemon: Any) -> None:
    """jwclient start --memory above --max-memory: bad_request naming the maximum;
    --io-write 1.5M is sent as bytes per second."""
    d = make_daemon("--max-memory", "64M")
    result = d.jwclient("start", "--memory", "1G", "--", "true")
    assert result.returncode != 0
    assert b"maximum of 67108864 bytes" in result.stderr, result.stderr
    ok = d.jwclient("--json", "start", "--io-write", "1.5M", "--", "true", check=True)
    assert json.loads(ok.stdout)["limits"]["memory"] == 64 * MiB
    assert json.loads(ok.stdout)["limits"]["io_write"] == 3 * MiB // 2


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
