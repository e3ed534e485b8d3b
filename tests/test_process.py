"""Real children on the real reactor: exit mapping, group stop, isolation of fds/env/cwd,
byte-exact logs, reaping without leaks, and start rate."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import dead, open_fd_count, until, zombie_children
from twisted.internet import process as twisted_process

from jobworker.jobs import posix_spawn, process, reaping
from jobworker.jobs.environment import JOB_ID_VAR, daemon_base_env
from jobworker.jobs.job import Job
from jobworker.jobs.logs import JobLogs, LogStore
from jobworker.jobs.manager import JobManager
from jobworker.testing import read_range, size
from jobworker.wire.record import EXITED, FAILED, LOST, STOPPED, JobRecord

# Last resort if a Deferred timeout fails to fire; each wait below has its own deadline.
pytestmark = pytest.mark.timeout(60, method="thread")

WAIT = 10.0  # generous deadline for anything that should take milliseconds


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def manager(reactor: Any, tmp_path: Any) -> JobManager:
    return JobManager(reactor, LogStore(str(tmp_path / "state" / "logs")), grace=2.0)


@pytest.fixture(params=["glibc", "os.posix_spawn"])
def spawn_path(request: Any, monkeypatch: Any) -> str:
    """Run a test on the glibc spawn path and again on the os.posix_spawn fallback."""
    if request.param == "glibc":
        if posix_spawn._libc_spawn is None:
            pytest.skip("this libc lacks posix_spawn_file_actions_addclosefrom_np")
    else:
        monkeypatch.setattr(posix_spawn, "_libc_spawn", None)
    return str(request.param)


async def ended(reactor: Any, job: Job, timeout: float = WAIT) -> JobRecord:
    d = job.when_ended()
    d.addTimeout(timeout, reactor)
    return await d


def output(job: Job, stream: str = "stdout") -> bytes:
    path = JobLogs(job.log_dir).path(stream)
    return read_range(path, 0, size(path))


def runs(pid: int, program: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].endswith(program.encode())
    except FileNotFoundError:
        return False


def read_pid(path: Any) -> Callable[[], bool]:
    return lambda: os.path.exists(path) and open(path).read().strip().isdigit()




@pytest.mark.parametrize("code", [0, 1, 255])
@pytest_twisted.ensureDeferred
async def test_exit_codes(reactor: Any, manager: JobManager, code: int) -> None:
    """The job's exit code is recorded as is."""
    job = manager.start("alice", "sh", ["-c", f"exit {code}"])
    record = await ended(reactor, job)
    assert (record.state, record.exit_code, record.signal) == (EXITED, code, None)


@pytest_twisted.ensureDeferred
async def test_killed_by_signal(reactor: Any, manager: JobManager) -> None:
    """A job killed by a signal is exited with the signal's name and no code."""
    job = manager.start("alice", "sh", ["-c", "kill -KILL $$"])
    record = await ended(reactor, job)
    assert (record.state, record.exit_code, record.signal) == (EXITED, None, "SIGKILL")


@pytest_twisted.ensureDeferred
async def test_exec_format_error_fails_job(reactor: Any, manager: JobManager, tmp_path: Any) -> None:
    """An executable the kernel cannot run gives a failed job with the kernel's reason."""
    prog = tmp_path / "garbage"
    prog.write_bytes(b"\x00\x01not a program")
    prog.chmod(0o755)
    job = manager.start("alice", str(prog), [])
    assert job.state == FAILED and job.error == f"cannot execute {prog} in {job.dir}: Exec format error"


@pytest_twisted.ensureDeferred
async def test_job_leads_its_own_session(reactor: Any, manager: JobManager, spawn_path: str) -> None:
    """The child is a session and process-group leader, apart from the daemon."""
    job = manager.start("alice", "sleep", ["60"])
    assert job.pid is not None
    assert os.getsid(job.pid) == job.pid and os.getpgid(job.pid) == job.pid
    assert os.getsid(job.pid) != os.getsid(0)
    record = await manager.stop(job).addTimeout(WAIT, reactor)
    assert (record.state, record.signal) == (STOPPED, "SIGTERM")


@pytest_twisted.ensureDeferred
async def test_term_ignoring_job_is_killed_after_grace(reactor: Any, manager: JobManager) -> None:
    """A job ignoring SIGTERM is SIGKILLed once the grace has passed."""
    job = manager.start("alice", "sh", ["-c", 'trap "" TERM; exec sleep 60'])
    assert job.pid is not None
    pid = job.pid
    await until(lambda: runs(pid, "sleep"))  # the trap is in place
    began = time.monotonic()
    record = await manager.stop(job, grace=0.3).addTimeout(WAIT, reactor)
    assert time.monotonic() - began >= 0.3
    assert (record.state, record.signal, record.exit_code) == (STOPPED, "SIGKILL", None)


@pytest_twisted.ensureDeferred
async def test_stop_kills_the_jobs_children(reactor: Any, manager: JobManager, tmp_path: Any) -> None:
    """Stop signals the whole process group, so a background child dies with the job."""
    pidfile = tmp_path / "child.pid"
    job = manager.start("alice", "sh", ["-c", f"sleep 60 & echo $! > {pidfile}; wait"])
    await until(read_pid(pidfile))
    child = int(pidfile.read_text())
    assert os.getpgid(child) == job.pid
    record = await manager.stop(job).addTimeout(WAIT, reactor)
    assert record.state == STOPPED
    await until(lambda: dead(child))


@pytest_twisted.ensureDeferred
async def test_kill_sweeps_children_outliving_the_leader(reactor: Any, manager: JobManager, tmp_path: Any) -> None:
    """A child ignoring TERM survives its leader until the grace deadline, then is KILLed."""
    pidfile = tmp_path / "child.pid"
    job = manager.start("alice", "sh", ["-c", f'(trap "" TERM; exec sleep 60) & echo $! > {pidfile}; wait'])
    await until(read_pid(pidfile))
    child = int(pidfile.read_text())
    await until(lambda: runs(child, "sleep"))
    record = await manager.stop(job, grace=0.5).addTimeout(WAIT, reactor)
    assert (record.state, record.signal) == (STOPPED, "SIGTERM")
    assert not dead(child)
    await until(lambda: dead(child))
    await manager.stopService()


@pytest_twisted.ensureDeferred
async def test_output_is_byte_exact(reactor: Any, manager: JobManager, spawn_path: str) -> None:
    """All 256 byte values reach stdout.log and stderr.log unchanged."""
    data = bytes(range(256))
    script = "import sys; d = bytes(range(256)); sys.stdout.buffer.write(d); sys.stderr.buffer.write(d[::-1])"
    job = manager.start("alice", sys.executable, ["-c", script])
    assert (await ended(reactor, job)).exit_code == 0
    assert output(job, "stdout") == data
    assert output(job, "stderr") == data[::-1]


@pytest_twisted.ensureDeferred
async def test_working_directory(reactor: Any, manager: JobManager, tmp_path: Any, spawn_path: str) -> None:
    """The job runs in its dir, and the daemon's own cwd is unchanged afterwards."""
    before = os.getcwd()
    job = manager.start("alice", "pwd", ["-P"], dir=str(tmp_path))
    await ended(reactor, job)
    assert output(job) == os.path.realpath(tmp_path).encode() + b"\n"
    assert os.getcwd() == before


@pytest_twisted.ensureDeferred
async def test_environment_is_base_plus_request(reactor: Any, manager: JobManager, monkeypatch: Any, spawn_path: str) -> None:
    """The child's environment is the documented base plus the request's entries, nothing else."""
    monkeypatch.setenv("JOBWORKER_SECRET_LEAK", "x")
    job = manager.start("alice", "env", [], env=["GREETING=hello world", "MULTI=a=b"])
    await ended(reactor, job)
    lines = output(job).decode().splitlines()
    assert dict(line.split("=", 1) for line in lines) == {
        **daemon_base_env(),
        "GREETING": "hello world",
        "MULTI": "a=b",
        JOB_ID_VAR: job.id,
    }


@pytest_twisted.ensureDeferred
async def test_child_has_only_stdio_fds(reactor: Any, manager: JobManager, spawn_path: str) -> None:
    """The child holds fds 0, 1, 2 and nothing else, even ones the daemon left inheritable;
    stdin is /dev/null."""
    script = (
        "import os\n"
        "def is_open(fd):\n"
        "    try: os.fstat(fd)\n"
        "    except OSError: return False\n"
        "    return True\n"
        "print(sorted(fd for fd in range(4096) if is_open(fd)), os.readlink('/proc/self/fd/0'))\n"
    )
    leaky = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leaky, True)
    try:
        job = manager.start("alice", sys.executable, ["-I", "-S", "-c", script])
    finally:
        os.close(leaky)
    await ended(reactor, job)
    assert output(job) == b"[0, 1, 2] /dev/null\n"


def test_descriptor_map_with_targets_that_are_also_sources(tmp_path: Any, spawn_path: str) -> None:
    """A map whose child fds are also parent fds (here a swap) still gives each child fd the
    parent fd asked for: the dup2s are ordered so none clobbers a later source."""
    a = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    b = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    script = (f"import os; os.write(1, b'1 '); os.write(2, b'2 '); os.write({a}, b'{a} ');"
              f" os.write({b}, b'{b} ')")
    try:
        pid = posix_spawn.posix_spawn_job(sys.executable, [sys.executable, "-c", script], {},
                                      str(tmp_path), {0: process._stdin_fd(), 1: a, 2: b,
                                                      a: b, b: a})
    finally:
        os.close(a)
        os.close(b)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "a").read_text() == f"1 {b} "
    assert (tmp_path / "b").read_text() == f"2 {a} "


def test_cached_file_actions_follow_directory_and_descriptors(tmp_path: Any,
                                                               monkeypatch: Any) -> None:
    """glibc path: the file actions are built once per (directory, fd map) and reused; every
    spawn still gets its own directory and descriptors, also past the cache's capacity."""
    spawner = posix_spawn._libc_spawn
    if spawner is None:
        pytest.skip("this libc lacks posix_spawn_file_actions_addclosefrom_np")
    monkeypatch.setattr(spawner, "ACTIONS_CACHE", 2)
    monkeypatch.setattr(spawner, "_actions", {})
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    script = "import os; print(os.getcwd())"
    for round_ in range(2):
        for d in dirs:  # three keys through a cache of two: built, evicted, built again
            out = os.open(d / f"out{round_}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                pid = posix_spawn.posix_spawn_job(sys.executable, [sys.executable, "-c", script],
                                              {}, str(d), {0: process._stdin_fd(), 1: out,
                                                           2: out})
            finally:
                os.close(out)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert (d / f"out{round_}").read_text() == f"{d}\n"
            assert len(spawner._actions) <= 2
    key = (str(dirs[2]), *{0: process._stdin_fd(), 1: out, 2: out}.items())
    assert key in spawner._actions  # the last one is cached, the first evicted
    assert (str(dirs[0]), *{0: process._stdin_fd(), 1: out, 2: out}.items()) \
        not in spawner._actions


@pytest_twisted.ensureDeferred
async def test_child_signal_dispositions_are_default(reactor: Any, manager: JobManager, spawn_path: str) -> None:
    """Signals Python ignores (SIGPIPE, SIGXFSZ) are default again, and none is blocked."""
    job = manager.start("alice", "grep", ["-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    await ended(reactor, job)
    fields = dict(line.split(":\t") for line in output(job).decode().splitlines())
    assert int(fields["SigBlk"], 16) == 0
    # glibc's posix_spawn leaves its two internal signals (32, 33) ignored; no real one is.
    assert int(fields["SigIgn"], 16) & ~((1 << 31) | (1 << 32)) == 0


@pytest_twisted.ensureDeferred
async def test_exit_status_reaped_elsewhere_is_lost(reactor: Any, manager: JobManager) -> None:
    """If something else in the daemon reaps a job's process, the job ends as lost."""
    job = manager.start("alice", "sleep", ["60"])
    assert job.pid is not None
    os.kill(job.pid, signal.SIGKILL)
    os.waitpid(job.pid, 0)  # noqa: ASYNC222 (a stray reaper steals the status)
    record = await ended(reactor, job)
    assert record.state == LOST and record.exit_code is None and record.signal is None


@pytest_twisted.ensureDeferred
async def test_without_pidfd_twisted_reaps_the_job(reactor: Any, manager: JobManager,
                                                   monkeypatch: Any) -> None:
    """Where pidfd_open is missing (old kernel), Twisted's SIGCHLD reaper ends the job, with
    its exact status."""
    def no_pidfd(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    job = manager.start("alice", "sh", ["-c", "exit 3"])
    assert job.pid in twisted_process.reapProcessHandlers or job.ended
    record = await ended(reactor, job)
    assert (record.state, record.exit_code) == (EXITED, 3)
    assert job.pid not in twisted_process.reapProcessHandlers


@pytest_twisted.ensureDeferred
async def test_jobs_end_with_sigchld_quiet_and_after_a_fallback(
        reactor: Any, manager: JobManager, monkeypatch: Any, tmp_path: Any) -> None:
    """With the reactor's SIGCHLD handler off (as in the daemon), a job watched on its pidfd
    still ends with its status; a job that must fall back to Twisted's reaper puts the
    handler back before it is handed over, and ends too."""
    twisted_handler = signal.getsignal(signal.SIGCHLD)
    if twisted_handler in (signal.SIG_DFL, signal.SIG_IGN, None):
        pytest.skip("the reactor installed no SIGCHLD handler in this process")
    signals = reaping.child_signals
    assert signals.quiet()
    try:
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
        job = manager.start("alice", "sh", ["-c", "exit 4"])
        assert (await ended(reactor, job)).exit_code == 4

        def no_pidfd(pid: int) -> int:
            raise OSError(errno.ENOSYS, "no pidfd_open here")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
        go = tmp_path / "go"
        os.mkfifo(go)  # the job cannot end before it is handed to Twisted's reaper
        job = manager.start("alice", "sh", ["-c", f"read x < {go}; exit 5"])
        assert signal.getsignal(signal.SIGCHLD) is twisted_handler
        assert not signals.quiet_now
        writer = os.open(go, os.O_RDWR)  # never blocks; the line waits for the reader
        try:
            os.write(writer, b"go\n")
            assert (await ended(reactor, job)).exit_code == 5
        finally:
            os.close(writer)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGCHLD) is twisted_handler


def test_sigchld_stays_while_twisteds_reaper_has_children(monkeypatch: Any) -> None:
    """quiet() leaves the handler alone while Twisted's reaper still watches a child, and
    when there is no Python handler to take off."""
    signals = reaping.ChildSignals()
    monkeypatch.setitem(twisted_process.reapProcessHandlers, 999_999_999, object())
    monkeypatch.setattr(signal, "getsignal", lambda n: (lambda *a: None))
    assert not signals.quiet()
    monkeypatch.delitem(twisted_process.reapProcessHandlers, 999_999_999)
    monkeypatch.setattr(signal, "getsignal", lambda n: signal.SIG_DFL)
    assert not signals.quiet()


@pytest_twisted.ensureDeferred
async def test_stop_service_stops_real_jobs(reactor: Any, manager: JobManager) -> None:
    """stopService ends every running job and leaves no timer of its own."""
    jobs = [manager.start("alice", "sleep", ["60"]) for _ in range(3)]
    await manager.stopService().addTimeout(WAIT, reactor)
    assert [j.state for j in jobs] == [STOPPED] * 3


@pytest_twisted.ensureDeferred
async def test_many_jobs_leave_no_zombie_or_fd(reactor: Any, manager: JobManager) -> None:
    """After 500 jobs have run, no zombie child remains and the fd count is back to baseline."""
    await ended(reactor, manager.start("alice", "true", []))  # let lazily made fds appear
    baseline = open_fd_count(os.getpid())
    jobs = [manager.start("alice", "true", []) for _ in range(500)]
    assert all(j.pid for j in jobs)
    records = [await ended(reactor, j) for j in jobs]
    assert {(r.state, r.exit_code) for r in records} == {(EXITED, 0)}
    assert open_fd_count(os.getpid()) == baseline
    assert zombie_children(os.getpid()) == []
    pids = {j.pid for j in jobs}
    assert not pids & set(twisted_process.reapProcessHandlers)
