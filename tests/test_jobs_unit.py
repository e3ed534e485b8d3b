"""Job and JobManager on a fake reactor and Clock: life cycle, escalation, timers, lookups."""

from __future__ import annotations

import errno
import os
import signal
import stat
from typing import Any

import msgpack
import pytest
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent

from jobworker.jobs.environment import JOB_ID_VAR, daemon_base_env
from jobworker.jobs.job import Job, signal_name
from jobworker.jobs.logs import JobLogs, LogStore
from jobworker.jobs.manager import JobManager
from jobworker.jobs.programs import SpawnError, resolve_program
from jobworker.testing import ProcessReactor, create_logs, read_range, size
from jobworker.wire import errors
from jobworker.wire.record import EXITED, FAILED, LOST, RUNNING, STOPPED, JobRecord

T0 = 1_795_000_000.25  # a fixed instant, 2026-11-18T11:06:40.25Z
GRACE = 5.0
TRUE = resolve_program("true", "/usr/bin:/bin")
SLEEP = resolve_program("sleep", "/usr/bin:/bin")


@pytest.fixture
def reactor() -> ProcessReactor:
    return ProcessReactor.at(T0)


@pytest.fixture
def manager(reactor: ProcessReactor, tmp_path: Any) -> JobManager:
    return JobManager(reactor, LogStore(str(tmp_path / "state" / "logs")), grace=GRACE, killpg=reactor.killpg)


def result_of(d: Deferred[Any]) -> Any:
    """The result of an already-fired Deferred (fails the test if it has not fired)."""
    results: list[Any] = []

    def keep(result: Any) -> Any:
        results.append(result)
        return result

    d.addBoth(keep)
    assert results, "Deferred has not fired"
    return results[0]


def fired(d: Deferred[Any]) -> bool:
    return d.called


def start(manager: JobManager, command: str = "sleep", args: list[str] | None = None, **kw: Any) -> Job:
    return manager.start("alice", command, ["60"] if args is None else args, **kw)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


# -- starting ----------------------------------------------------------------------------


def test_start_spawns_resolved_program_as_running_job(manager: JobManager, reactor: ProcessReactor) -> None:
    """A started job is running with the spawned pid, argv[0] as given and fds 0/1/2 mapped."""
    job = start(manager, "sleep", ["60"], dir="/tmp")
    [proc] = reactor.processes
    record = job.record()
    assert record.state == RUNNING and record.pid == proc.pid == job.pid
    assert proc.executable == SLEEP
    assert proc.args == ["sleep", "60"]
    assert proc.path == "/tmp"
    assert sorted(proc.child_fds) == [0, 1, 2]
    assert record.started_at == "2026-11-18T11:06:40.250000Z"
    assert record.ended_at is None and record.exit_code is None and record.signal is None
    assert record.owner == "alice" and record.command == "sleep" and record.args == ["60"]


def test_start_creates_empty_log_files(manager: JobManager, reactor: ProcessReactor) -> None:
    """The job's log dir is <id>-<stamp> under the store and holds two empty files."""
    job = start(manager)
    assert os.path.basename(job.log_dir) == f"{job.id}-20261118T110640.250000Z"
    logs = JobLogs(job.log_dir)
    assert size(logs.stdout_path) == 0 and size(logs.stderr_path) == 0


def test_start_logs_started_event(manager: JobManager, events: list[dict[str, Any]]) -> None:
    """job.started carries the job id, owner and pid."""
    job = start(manager)
    [event] = named(events, "job.started")
    assert (event["job_id"], event["owner"], event["pid"]) == (job.id, "alice", job.pid)


# The keyword-field formats these events had: the operator's line must read the same.
STARTED_LINE = "{event} job={job_id} owner={owner} pid={pid} command={command!r}"
ENDED_LINE = ("{event} job={job_id} owner={owner} pid={pid} state={state} exit_code={exit_code}"
              " signal={signal} timed_out={timed_out}")


def test_started_and_ended_lines_read_as_before(
    manager: JobManager, reactor: ProcessReactor, events: list[dict[str, Any]], tmp_path: Any
) -> None:
    """job.started and job.ended render exactly as their keyword-field formats did, even with
    braces in the command, and keep every key."""
    prog = tmp_path / "we{ir}d {0} {x!r}"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    job = start(manager, f"./{prog.name}", [], dir=str(tmp_path))
    reactor.processes[0].kill(signal.SIGTERM)
    [started] = named(events, "job.started")
    [ended] = named(events, "job.ended")
    assert formatEvent(started) == STARTED_LINE.format(**started)
    assert formatEvent(ended) == ENDED_LINE.format(**ended)
    assert "command='./we{ir}d {0} {x!r}'" in formatEvent(started)
    assert (started["job_id"], started["owner"], started["pid"], started["command"]) == (
        job.id, "alice", job.pid, job.command)
    assert (ended["state"], ended["exit_code"], ended["signal"], ended["timed_out"]) == (
        EXITED, None, "SIGTERM", False)


def test_relative_dir_is_made_absolute(manager: JobManager, reactor: ProcessReactor) -> None:
    """A relative dir is taken against the daemon's cwd; none means the daemon's cwd."""
    job = start(manager, dir=".")
    assert job.dir == os.getcwd() and reactor.processes[0].path == os.getcwd()
    assert start(manager).dir == os.getcwd()


def test_program_resolved_in_job_path(manager: JobManager, reactor: ProcessReactor, tmp_path: Any) -> None:
    """The program is looked up in the job's PATH after the request's overlay."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    prog = bindir / "myprog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    job = start(manager, "myprog", [], env=[f"PATH={bindir}"])
    assert job.state == RUNNING
    assert reactor.processes[0].executable == str(prog)


def test_command_with_slash_is_relative_to_job_dir(manager: JobManager, reactor: ProcessReactor, tmp_path: Any) -> None:
    """A command containing '/' is a path taken against the job's dir."""
    prog = tmp_path / "run.sh"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o700)
    start(manager, "./run.sh", [], dir=str(tmp_path))
    assert reactor.processes[0].executable == str(prog)


# -- environment -------------------------------------------------------------------------


def test_env_is_documented_base_only(manager: JobManager, reactor: ProcessReactor, monkeypatch: Any) -> None:
    """Without a request env the job sees exactly PATH, HOME, USER, LOGNAME and its id."""
    monkeypatch.setenv("JOBWORKER_SECRET_LEAK", "x")
    job = start(manager)
    env = reactor.processes[0].env
    assert env == {**daemon_base_env(), JOB_ID_VAR: job.id}
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", JOB_ID_VAR}


def test_request_env_overlays_base(manager: JobManager, reactor: ProcessReactor) -> None:
    """Request entries add and override (later wins; '=' allowed in values) but not the job id."""
    job = start(manager, env=["FOO=a=b", "HOME=/srv", "EMPTY=", "FOO=c=d", f"{JOB_ID_VAR}=forged"])
    env = reactor.processes[0].env
    assert env["FOO"] == "c=d" and env["HOME"] == "/srv" and env["EMPTY"] == ""
    assert env[JOB_ID_VAR] == job.id


@pytest.mark.parametrize(
    "entry", ["NOEQUALS", "=value", "", "A\0B=c", "A=b\0c"], ids=["no-eq", "empty-key", "empty", "nul-key", "nul-value"]
)
def test_bad_env_entry_fails_job(manager: JobManager, reactor: ProcessReactor, entry: str) -> None:
    """A malformed KEY=VALUE entry gives a failed job naming the entry, and nothing is spawned."""
    job = start(manager, env=["OK=1", entry])
    assert job.state == FAILED
    assert "bad environment entry" in (job.error or "")
    assert reactor.processes == []


# -- start failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, dir, message",
    [
        ("no-such-program-xyz", None, "no such program: no-such-program-xyz"),
        ("/etc/passwd", None, "not executable: /etc/passwd"),
        ("/tmp", None, "not a regular file: /tmp"),
        ("/nope/prog", None, "no such program: /nope/prog"),
        ("sleep", "/nope", "no such directory: /nope"),
        ("sleep", "/etc/passwd", "not a directory: /etc/passwd"),
    ],
)
def test_start_failures_give_failed_record(
    manager: JobManager, reactor: ProcessReactor, events: list[dict[str, Any]], command: str, dir: str | None, message: str
) -> None:
    """Each start failure is a complete failed record with a clear error, not an exception."""
    job = start(manager, command, dir=dir)
    record = job.record()
    assert record.state == FAILED and record.error == message
    assert record.pid is None and record.exit_code is None
    assert record.ended_at == record.started_at
    assert os.path.isdir(record.log_dir) and size(JobLogs(record.log_dir).stdout_path) == 0
    assert reactor.processes == []
    assert result_of(job.when_ended()) == record
    assert [e["job_id"] for e in named(events, "job.failed")] == [job.id]


def test_spawn_oserror_fails_job(manager: JobManager, reactor: ProcessReactor) -> None:
    """An OSError from the spawn (e.g. exec format error) gives a failed job."""
    reactor.spawn_error = OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC))
    job = start(manager)
    assert job.state == FAILED
    assert job.error == f"cannot execute {SLEEP} in {job.dir}: Exec format error"


def test_unexpected_spawn_error_fails_job_and_logs_traceback(
    manager: JobManager, reactor: ProcessReactor, events: list[dict[str, Any]]
) -> None:
    """A non-OSError from the spawner (a bug) still ends the record, with the traceback logged."""
    reactor.spawn_error = RuntimeError("boom")
    job = start(manager)
    assert job.state == FAILED and job.error == "internal error while starting the job"
    [event] = named(events, "job.spawn_bug")
    assert event["log_failure"].check(RuntimeError)
    assert manager.jobs(running_only=True) == []


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_bad_timeout_fails_job(manager: JobManager, timeout: float) -> None:
    """A run-time limit must be a positive finite number of seconds."""
    assert start(manager, timeout=timeout).state == FAILED


def test_nul_in_argument_fails_job(manager: JobManager) -> None:
    """Arguments cannot carry NUL bytes (exec cannot pass them)."""
    job = start(manager, args=["a\0b"])
    assert job.state == FAILED and "NUL" in (job.error or "")


def test_unwritable_log_store_fails_job(reactor: ProcessReactor, tmp_path: Any) -> None:
    """If the log dir cannot be made the job fails with that reason."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    manager = JobManager(reactor, LogStore(str(blocker)), killpg=reactor.killpg)
    job = start(manager)
    assert job.state == FAILED and "cannot create job logs" in (job.error or "")


def test_failed_spawn_closes_log_fds(manager: JobManager, reactor: ProcessReactor) -> None:
    """The parent's copies of the log fds are closed whether or not spawn works; stdin's
    /dev/null is one descriptor kept for the daemon's life, not one per job."""
    start(manager)  # the first spawn opens the shared /dev/null
    stdin = reactor.processes[-1].child_fds[0]
    before = len(os.listdir("/proc/self/fd"))
    start(manager)
    reactor.spawn_error = OSError(errno.EACCES, "Permission denied")
    start(manager)
    assert len(os.listdir("/proc/self/fd")) == before
    assert reactor.processes[-1].child_fds[0] == stdin
    assert os.readlink(f"/proc/self/fd/{stdin}") == os.devnull


# -- ending ------------------------------------------------------------------------------


def test_normal_exit(manager: JobManager, reactor: ProcessReactor, events: list[dict[str, Any]]) -> None:
    """Exit 0 ends the job as exited with code 0 and the clock's time."""
    job = start(manager)
    d = job.when_ended()
    reactor.advance(1.5)
    reactor.processes[0].exit(0)
    record = result_of(d)
    assert (record.state, record.exit_code, record.signal) == (EXITED, 0, None)
    assert record.ended_at == "2026-11-18T11:06:41.750000Z"
    [event] = named(events, "job.ended")
    assert (event["job_id"], event["state"], event["exit_code"]) == (job.id, EXITED, 0)


@pytest.mark.parametrize("code", [1, 255])
def test_nonzero_exit(manager: JobManager, reactor: ProcessReactor, code: int) -> None:
    """A non-zero exit code is kept."""
    job = start(manager)
    reactor.processes[0].exit(code)
    assert (job.state, job.exit_code, job.signal) == (EXITED, code, None)


def test_killed_by_signal(manager: JobManager, reactor: ProcessReactor) -> None:
    """Death by a signal nobody asked for: exited, signal named, no exit code."""
    job = start(manager)
    reactor.processes[0].kill(signal.SIGSEGV)
    record = job.record()
    assert (record.state, record.exit_code, record.signal) == (EXITED, None, "SIGSEGV")
    assert record.exit_status() == 128 + signal.SIGSEGV


def test_lost_exit_status(manager: JobManager, reactor: ProcessReactor) -> None:
    """An end with neither code nor signal (status lost) is recorded as lost."""
    from twisted.internet.error import ProcessTerminated

    job = start(manager)
    reactor.processes[0]._end(ProcessTerminated(None, None, None))
    assert job.state == LOST and job.error


def test_signal_names() -> None:
    """Signal numbers map to their names, real-time ones relative to SIGRTMIN."""
    assert signal_name(9) == "SIGKILL"
    assert signal_name(signal.SIGRTMIN + 2) == "SIGRTMIN+2"
    assert signal_name(signal.SIGRTMAX) == "SIGRTMAX"


def test_process_ending_during_spawn_is_applied_after_start(
    reactor: ProcessReactor, tmp_path: Any, events: list[dict[str, Any]]
) -> None:
    """A child reaped before spawn returns still gives started-then-ended, with its pid."""

    def spawner(reactor_: Any, protocol: Any, *args: Any) -> Any:
        proc = reactor.spawnProcess(protocol, args[0], args[1], args[2], path=args[3])
        proc.exit(7)
        return proc

    manager = JobManager(reactor, LogStore(str(tmp_path)), spawner=spawner, killpg=reactor.killpg)
    job = manager.start("alice", "true", [], timeout=10)
    assert (job.state, job.exit_code, job.pid) == (EXITED, 7, 1000)
    assert [e["event"] for e in events if e.get("event", "").startswith("job.")] == ["job.started", "job.ended"]
    assert reactor.getDelayedCalls() == []
    assert manager.find(1000) is job and manager.jobs(running_only=True) == []


# -- when_ended --------------------------------------------------------------------------


def test_when_ended_gives_independent_deferreds(manager: JobManager, reactor: ProcessReactor) -> None:
    """Each call gets its own Deferred; one observer's callbacks do not affect another's."""
    job = start(manager)
    first, second = job.when_ended(), job.when_ended()
    assert first is not second
    first.addCallback(lambda _: "changed by first observer")
    reactor.processes[0].exit(0)
    assert result_of(first) == "changed by first observer"
    assert isinstance(result_of(second), JobRecord)
    late = job.when_ended()
    assert late is not first and result_of(late) == job.record()


# -- stop --------------------------------------------------------------------------------


def test_stop_escalates_term_then_kill_at_grace(manager: JobManager, reactor: ProcessReactor) -> None:
    """Stop sends TERM to the group at once and KILL exactly when the grace runs out."""
    job = start(manager)
    d = manager.stop(job)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM]
    reactor.advance(GRACE - 0.001)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM]
    assert not fired(d)
    reactor.advance(0.001)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM, signal.SIGKILL]
    reactor.processes[0].kill(signal.SIGKILL)
    record = result_of(d)
    assert (record.state, record.signal, record.exit_code, record.timed_out) == (STOPPED, "SIGKILL", None, False)
    assert reactor.getDelayedCalls() == []


def test_stop_with_explicit_grace(manager: JobManager, reactor: ProcessReactor) -> None:
    """A per-call grace overrides the manager's."""
    job = start(manager)
    manager.stop(job, grace=0.5)
    reactor.advance(0.5)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM, signal.SIGKILL]


def test_stop_negative_grace_is_bad_request(manager: JobManager) -> None:
    """A negative grace is refused."""
    with pytest.raises(errors.BadRequest):
        manager.stop(start(manager), grace=-1)


def test_stop_keeps_exit_code_when_job_exits_on_term(manager: JobManager, reactor: ProcessReactor) -> None:
    """A job that exits with a code during the stop is stopped with that code."""
    job = start(manager)
    d = manager.stop(job)
    reactor.processes[0].exit(143)
    record = result_of(d)
    assert (record.state, record.exit_code, record.signal) == (STOPPED, 143, None)


def test_stop_records_term_signal(manager: JobManager, reactor: ProcessReactor) -> None:
    """A job killed by the TERM is stopped with signal SIGTERM."""
    job = start(manager)
    d = manager.stop(job)
    reactor.processes[0].kill(signal.SIGTERM)
    assert (result_of(d).state, result_of(d).signal) == (STOPPED, "SIGTERM")


def test_kill_sweeps_group_after_leader_exits(manager: JobManager, reactor: ProcessReactor) -> None:
    """The KILL still hits the group at the grace deadline when children outlive the leader."""
    job = start(manager)
    manager.stop(job)
    reactor.set_lingering(job.pid)
    reactor.processes[0].exit(0)
    assert job.state == STOPPED
    reactor.advance(GRACE)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM, signal.SIGKILL]
    assert reactor.getDelayedCalls() == []


def test_late_sweep_spares_a_new_job_with_reused_pid(manager: JobManager, reactor: ProcessReactor) -> None:
    """If the pid is reused by another running job before the sweep, its group is not killed."""
    job = start(manager)
    manager.stop(job)
    reactor.processes[0].exit(0)
    reactor.next_pid = job.pid
    other = start(manager)
    assert other.pid == job.pid
    reactor.advance(GRACE)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM]
    assert other.state == RUNNING


def test_stop_ended_job_returns_record_at_once(manager: JobManager, reactor: ProcessReactor) -> None:
    """Stopping a job that already ended is not an error and sends nothing."""
    job = start(manager)
    reactor.processes[0].exit(3)
    record = result_of(manager.stop(job))
    assert (record.state, record.exit_code) == (EXITED, 3)
    assert reactor.signals == [] and reactor.getDelayedCalls() == []


def test_stop_failed_job_returns_record(manager: JobManager) -> None:
    """Stopping a job that never started returns its failed record."""
    job = start(manager, "no-such-program-xyz")
    assert result_of(manager.stop(job)).state == FAILED


def test_concurrent_stops_share_one_escalation(manager: JobManager, reactor: ProcessReactor) -> None:
    """Two stops send one TERM and one KILL, and both fire with the same final record."""
    job = start(manager)
    first = manager.stop(job)
    reactor.advance(1)
    second = manager.stop(job, grace=0.1)
    assert first is not second
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(GRACE - 1)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM, signal.SIGKILL]
    reactor.processes[0].kill(signal.SIGKILL)
    assert result_of(first) == result_of(second)


def test_stop_tolerates_vanished_group(manager: JobManager, reactor: ProcessReactor) -> None:
    """ProcessLookupError from killpg (group already gone) is ignored."""
    job = start(manager)

    def gone(pgid: int, sig: int) -> None:
        raise ProcessLookupError(3, "No such process")

    manager._killpg = gone
    d = manager.stop(job)
    reactor.advance(GRACE)
    reactor.processes[0].kill(signal.SIGKILL)
    assert result_of(d).state == STOPPED


# -- timeout -----------------------------------------------------------------------------


def test_timeout_stops_job_and_sets_timed_out(manager: JobManager, reactor: ProcessReactor, events: list[dict[str, Any]]) -> None:
    """After the run-time limit the job gets the stop escalation and is marked timed out."""
    job = start(manager, timeout=30)
    d = job.when_ended()
    reactor.advance(29.999)
    assert reactor.signals == []
    reactor.advance(0.001)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM]
    assert named(events, "job.timeout")
    reactor.advance(GRACE)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM, signal.SIGKILL]
    reactor.processes[0].kill(signal.SIGKILL)
    record = result_of(d)
    assert (record.state, record.timed_out, record.signal, record.timeout) == (STOPPED, True, "SIGKILL", 30)


def test_timeout_cancelled_on_exit(manager: JobManager, reactor: ProcessReactor) -> None:
    """A job that ends in time leaves no timer behind and is not timed out."""
    job = start(manager, timeout=30)
    reactor.processes[0].exit(0)
    assert reactor.getDelayedCalls() == []
    reactor.advance(60)
    assert reactor.signals == [] and job.timed_out is False


def test_user_stop_before_timeout_is_not_timed_out(manager: JobManager, reactor: ProcessReactor) -> None:
    """A stop requested before the limit cancels the limit; the record is not timed out."""
    job = start(manager, timeout=2)
    d = manager.stop(job)
    reactor.advance(3)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM]
    reactor.processes[0].kill(signal.SIGTERM)
    assert result_of(d).timed_out is False


# -- lookups -----------------------------------------------------------------------------


def test_get_and_not_found(manager: JobManager) -> None:
    """get finds by id; an unknown id is NotFound."""
    job = start(manager)
    assert manager.get(job.id) is job
    with pytest.raises(errors.NotFound):
        manager.get("00000000-0000-0000-0000-000000000000")


def test_find_by_id_or_pid(manager: JobManager) -> None:
    """find accepts an id, an int pid or a decimal pid string."""
    job = start(manager)
    assert manager.find(job.id) is job
    assert manager.find(job.pid) is job
    assert manager.find(str(job.pid)) is job
    with pytest.raises(errors.NotFound):
        manager.find(4242)


def test_find_by_reused_pid_prefers_running_then_newest(manager: JobManager, reactor: ProcessReactor) -> None:
    """With a reused pid, find picks the running job, else the newest that had the pid."""
    old = start(manager)
    reactor.process(old.pid).exit(0)
    reactor.next_pid = old.pid
    middle = start(manager)
    reactor.next_pid = 5000
    start(manager)
    assert manager.find(old.pid) is middle
    reactor.process(middle.pid).exit(0)
    reactor.next_pid = old.pid
    newest = start(manager)
    reactor.process(newest.pid).exit(0)
    assert manager.find(old.pid) is newest
    reactor.next_pid = old.pid
    running = start(manager)
    assert manager.find(old.pid) is running


def test_jobs_newest_first(manager: JobManager, reactor: ProcessReactor) -> None:
    """jobs() lists newest first; running_only leaves out ended and failed ones."""
    a, b, c = start(manager), start(manager, "no-such-program-xyz"), start(manager)
    reactor.process(a.pid).exit(0)
    assert manager.jobs() == [c, b, a]
    assert manager.jobs(running_only=True) == [c]


# -- service -----------------------------------------------------------------------------


def test_stop_service_stops_everything(manager: JobManager, reactor: ProcessReactor) -> None:
    """stopService TERMs every running job, KILLs after the grace, fires when all ended."""
    manager.startService()
    jobs = [start(manager) for _ in range(3)]
    ended = start(manager)
    reactor.process(ended.pid).exit(0)
    d = manager.stopService()
    assert sorted(reactor.signals) == sorted((j.pid, signal.SIGTERM) for j in jobs)
    reactor.process(jobs[0].pid).exit(0)
    reactor.advance(GRACE)
    assert [s for _, s in reactor.signals].count(signal.SIGKILL) == 2
    assert not fired(d)
    for job in jobs[1:]:
        reactor.process(job.pid).kill(signal.SIGKILL)
    result_of(d)
    assert all(j.state == STOPPED and j.ended_at for j in jobs)
    assert reactor.getDelayedCalls() == []
    with pytest.raises(errors.Unavailable):
        start(manager)


def test_stop_service_cancels_sweep_of_empty_group(manager: JobManager, reactor: ProcessReactor) -> None:
    """A pending KILL sweep whose group has no member left is cancelled, not waited for."""
    job = start(manager)
    manager.stop(job)
    reactor.processes[0].exit(0)
    d = manager.stopService()
    assert fired(d)
    assert reactor.getDelayedCalls() == []
    assert reactor.signals_to(job.pid) == [signal.SIGTERM]


def test_stop_service_waits_for_sweep_of_lingering_group(manager: JobManager, reactor: ProcessReactor) -> None:
    """A group whose members outlive the leader still gets its KILL before shutdown completes."""
    job = start(manager)
    manager.stop(job)
    reactor.set_lingering(job.pid)
    reactor.processes[0].exit(0)
    d = manager.stopService()
    assert not fired(d)
    reactor.advance(GRACE)
    assert fired(d)
    assert reactor.signals_to(job.pid) == [signal.SIGTERM, signal.SIGKILL]


def test_start_service_raises_nofile_limit(manager: JobManager) -> None:
    """startService leaves RLIMIT_NOFILE's soft limit at the hard limit."""
    import resource

    manager.startService()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard


# -- logs and program lookup ---------------------------------------------------------------


def test_log_store_modes_and_names(tmp_path: Any) -> None:
    """Log root and job dirs are 0750, files 0640, whatever the umask."""
    old = os.umask(0o077)
    try:
        logs = create_logs(LogStore(str(tmp_path / "state" / "logs")), "abc", T0)
    finally:
        os.umask(old)
    assert logs.dir == str(tmp_path / "state" / "logs" / "abc-20261118T110640.250000Z")
    assert stat.S_IMODE(os.stat(os.path.dirname(logs.dir)).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(logs.dir).st_mode) == 0o750
    for stream in ("stdout", "stderr"):
        assert stat.S_IMODE(os.stat(logs.path(stream)).st_mode) == 0o640
    with pytest.raises(ValueError):
        logs.path("stdin")


def test_log_store_refuses_unsafe_ids(tmp_path: Any) -> None:
    """An id that would escape the log root is refused."""
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            create_logs(LogStore(str(tmp_path)), bad, T0)


def test_open_for_child_appends_close_on_exec(tmp_path: Any) -> None:
    """The child's fds are append-only, write-only and close-on-exec in the parent."""
    import fcntl

    logs = create_logs(LogStore(str(tmp_path)), "abc", T0)
    out, err = logs.open_for_child()
    try:
        for fd in (out, err):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            assert flags & os.O_APPEND and flags & os.O_ACCMODE == os.O_WRONLY
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(out, b"hello world")
    finally:
        os.close(out)
        os.close(err)
    assert size(logs.stdout_path) == 11
    assert read_range(logs.stdout_path, 6, 100) == b"world"
    assert read_range(logs.stdout_path, 0, 5) == b"hello"
    assert read_range(logs.stdout_path, 50, 5) == b""


def test_resolve_program_errors(tmp_path: Any) -> None:
    """resolve_program explains what is wrong with the command."""
    assert resolve_program("sh", "relative:/bin") == "/bin/sh"
    with pytest.raises(SpawnError, match="no such program: nope-xyz"):
        resolve_program("nope-xyz", "/bin")
    with pytest.raises(SpawnError, match="no such program: ''"):
        resolve_program("", "/bin")
    noexec = tmp_path / "tool"
    noexec.write_text("")
    with pytest.raises(SpawnError, match=f"not executable: {noexec}"):
        resolve_program("tool", str(tmp_path))
    later = tmp_path / "later"
    later.mkdir()
    (later / "tool").write_text("")
    (later / "tool").chmod(0o755)
    assert resolve_program("tool", f"{tmp_path}:{later}") == str(later / "tool")


def test_cancelled_observers_are_forgotten_at_once(reactor: ProcessReactor,
                                                   manager: JobManager) -> None:
    """A cancelled when_ended Deferred is dropped from the job, not kept until it ends."""
    job = manager.start("alice", "/bin/true", [])
    waiters = [job.when_ended() for _ in range(100)]
    for d in waiters:
        d.cancel()
        d.addErrback(lambda f: None)
    kept = job.when_ended()
    assert job._observers == [kept]
    reactor.process(job.pid).exit(0)
    assert kept.called


def test_packed_record_follows_the_job_and_is_kept_once_it_ended(
        manager: JobManager, reactor: ProcessReactor) -> None:
    """packed() is always the encoding of the current record; while running it is made
    afresh (the record still changes), and once ended the same bytes are reused."""
    job = start(manager)
    running = job.packed()
    assert msgpack.unpackb(running) == job.record().to_wire()
    assert msgpack.unpackb(running)["state"] == RUNNING
    reactor.process(job.pid).exit(3)
    ended = job.packed()
    assert msgpack.unpackb(ended) == job.record().to_wire()
    assert (msgpack.unpackb(ended)["state"], msgpack.unpackb(ended)["exit_code"]) == (EXITED, 3)
    assert job.packed() is ended
    # What a finished job answers does not move afterwards, not even for a stop.
    result_of(manager.stop(job))
    assert job.packed() is ended


def test_find_treats_a_decimal_string_as_a_pid_and_anything_else_as_an_id(
        manager: JobManager) -> None:
    job = start(manager)
    with pytest.raises(errors.NotFound):
        manager.find("12a")
    with pytest.raises(errors.NotFound):
        manager.find("")
    assert manager.find(f"{job.pid}") is job
