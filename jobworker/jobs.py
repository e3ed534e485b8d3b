"""Jobs and their life cycle: start, the TERM-then-KILL stop escalation, run-time limits,
and the in-memory table of every job this daemon has run."""

from __future__ import annotations

import math
import os
import pwd
import signal
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python.failure import Failure

from jobworker import codec, errors
from jobworker.logs import LogStore
from jobworker.messages import EXITED, FAILED, LOST, RUNNING, STOPPED, JobRecord, iso8601
from jobworker.process import (
    JobProcessProtocol,
    SpawnError,
    check_directory,
    raise_nofile_limit,
    resolve_program,
    spawn,
)
from jobworker.store import JobStore, MemoryStore

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_ID_VAR = "JOBWORKER_JOB_ID"


class SpareLogDirs(Protocol):
    """Log directories made ahead of time; ``jobworker.logpool.LogDirPool`` is the real one.
    Without one, JobManager makes each job's directory when the job starts."""

    def take(self, log_dir: str) -> tuple[int, int] | None:
        """Rename a spare to ``log_dir`` and hand over its (stdout, stderr) descriptors,
        or None when none is ready."""
        ...


class Spawner(Protocol):
    """What JobManager needs to start a process; ``jobworker.process.spawn`` is the real one."""

    def __call__(
        self,
        reactor: Any,
        protocol: JobProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: dict[str, str],
        cwd: str,
        stdout_fd: int,
        stderr_fd: int,
    ) -> Any: ...


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; real-time signals as ``SIGRTMIN+n``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number < signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"


def daemon_base_env() -> dict[str, str]:
    """The documented environment every job starts from (before the request's overlay);
    nothing of the daemon's own environment leaks into it."""
    try:
        entry = pwd.getpwuid(os.geteuid())
        home, user = entry.pw_dir, entry.pw_name
    except KeyError:
        home, user = "/", str(os.geteuid())
    return {"PATH": DEFAULT_PATH, "HOME": home, "USER": user, "LOGNAME": user}


def parse_env(entries: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` to a dict, later entries winning; raises ValueError with a message
    naming the bad entry."""
    result: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"bad environment entry {entry!r}: expected a KEY=VALUE string")
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"bad environment entry {entry!r}: expected KEY=VALUE")
        if "\0" in entry:
            raise ValueError(f"bad environment entry {entry!r}: contains a NUL byte")
        result[key] = value
    return result


class Job:
    """One job: its record fields, its timers and how it ends.

    The Job owns all policy (stop escalation, time limit, how an exit maps to a state); the
    process protocol only tells it that the process ended, which happens exactly once.
    """

    # Slots: a daemon keeps every ended Job in its history.  (With a plain __dict__, a
    # 31st attribute would also end CPython's key sharing between instances, ~1.3 KiB more
    # per job.)
    __slots__ = (
        "_reactor", "id", "owner", "command", "args", "dir", "log_dir", "timeout",
        "executable", "state", "pid", "exit_code", "signal", "error", "started",
        "_started_at", "_packed", "ended_at", "timed_out", "_timeout_grace", "_signal_group",
        "_on_ended", "protocol", "_observers", "_stopping", "_spawning", "_early_end",
        "_timeout_call", "_kill_call", "_kill_waiters",
    )

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        id: str,
        owner: str,
        command: str,
        args: list[str],
        dir: str,
        log_dir: str,
        started: float,
        timeout: float | None,
        timeout_grace: float,
        signal_group: Callable[[Job, int], None],
        on_ended: Callable[[Job], None],
    ) -> None:
        self._reactor = reactor
        self.id = id
        self.owner = owner
        self.command = command
        self.args = args
        self.dir = dir
        self.log_dir = log_dir
        self.timeout = timeout
        self.executable: str | None = None
        self.state = RUNNING
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.error: str | None = None
        self.started = started
        self._started_at: tuple[float, str] | None = None
        self._packed: codec.Encoded | None = None
        self.ended_at: str | None = None
        self.timed_out = False
        self._timeout_grace = timeout_grace
        self._signal_group = signal_group
        self._on_ended = on_ended
        self.protocol = JobProcessProtocol(self._process_ended)
        self._observers: list[Deferred[JobRecord]] = []
        self._stopping = False
        self._spawning = False
        self._early_end: Failure | None = None
        self._timeout_call: DelayedCall | None = None
        self._kill_call: DelayedCall | None = None
        self._kill_waiters: list[Deferred[None]] = []

    # -- what clients see --------------------------------------------------------------

    @property
    def started_at(self) -> str:
        # Formatted once: every status, list and start reply carries it.
        if self._started_at is None or self._started_at[0] != self.started:
            self._started_at = (self.started, iso8601(self.started))
        return self._started_at[1]

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def record(self) -> JobRecord:
        """The job as clients (and a future store) see it: the one Job → JobRecord mapping."""
        return JobRecord(**self._fields())

    def wire(self) -> dict[str, Any]:
        """Exactly ``record().to_wire()``, without building the record and then taking it
        apart again with ``dataclasses.asdict`` (about 18 µs of the ~25 µs a ``status``
        spends on the record)."""
        return self._fields()

    def packed(self) -> codec.Encoded:
        """``wire()`` encoded as msgpack.  An ended job's record never changes again, so it
        is encoded once: a ``status`` or ``list`` of finished jobs, the common case, sends
        these bytes as they are."""
        packed = self._packed
        if packed is None:
            packed = codec.Encoded(codec.encode(self._fields()))
            if self.ended:
                self._packed = packed
        return packed

    def _fields(self) -> dict[str, Any]:
        # In JobRecord's field order, so both forms serialise identically.
        return {
            "id": self.id,
            "pid": self.pid,
            "command": self.command,
            "args": list(self.args),
            "dir": self.dir,
            "owner": self.owner,
            "state": self.state,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "log_dir": self.log_dir,
            "timed_out": self.timed_out,
            "timeout": self.timeout,
        }

    def when_ended(self) -> Deferred[JobRecord]:
        """A new Deferred for each caller, fired with the final record."""
        if self.ended:
            return succeed(self.record())
        # A cancelled observer (a follower or waiter that went away) leaves at once,
        # rather than accumulating until the job ends.
        d: Deferred[JobRecord] = Deferred(self._forget_observer)
        self._observers.append(d)
        return d

    def _forget_observer(self, d: Deferred[JobRecord]) -> None:
        if d in self._observers:
            self._observers.remove(d)

    # -- life cycle, driven by JobManager ------------------------------------------------

    def fail(self, error: str) -> None:
        """The job could not be started."""
        self._spawning = False
        self.state = FAILED
        self.error = error
        self.log.warn(  # noqa: G010 (twisted.logger has no warning())
            "{event} job={job_id} owner={owner} command={command!r}: {error}",
            event="job.failed",
            job_id=self.id,
            owner=self.owner,
            state=self.state,
            command=self.command,
            error=error,
        )
        self._finish()

    def spawning(self) -> None:
        """The spawner is about to run; an end reported before ``spawned`` is held back."""
        self._spawning = True

    def spawned(self) -> None:
        """The process exists: log it, arm the time limit, then apply any early end."""
        self._spawning = False
        self.pid = self.protocol.pid
        self.log.info(
            _as_format(f"job.started job={self.id} owner={self.owner} pid={self.pid}"
                       f" command={self.command!r}"),
            event="job.started",
            job_id=self.id,
            owner=self.owner,
            pid=self.pid,
            state=self.state,
            command=self.command,
        )
        if self._early_end is not None:
            reason, self._early_end = self._early_end, None
            self._process_ended(reason)
        elif self.timeout is not None:
            self._timeout_call = self._reactor.callLater(self.timeout, self._time_is_up)

    def stop(self, grace: float) -> Deferred[JobRecord]:
        """TERM the process group now and KILL it after ``grace`` seconds; fires with the
        final record once the job has ended.  Later stops share the first escalation."""
        if self.ended:
            return succeed(self.record())
        ended = self.when_ended()
        if self._stopping:
            return ended
        self._stopping = True
        self._cancel_timeout()
        self.log.info(
            "{event} job={job_id} pid={pid} grace={grace}",
            event="job.stopping",
            job_id=self.id,
            pid=self.pid,
            grace=grace,
            timed_out=self.timed_out,
        )
        self._kill_call = self._reactor.callLater(grace, self._kill)
        self._signal(signal.SIGTERM)
        return ended

    def settle(self) -> Deferred[None]:
        """Fires once no KILL sweep is pending; a pending sweep of a group with no member
        left is simply cancelled (used at shutdown so no timer outlives the manager)."""
        if self._kill_call is None or not self._kill_call.active():
            return succeed(None)
        if self.ended and not self._group_alive():
            self._kill_call.cancel()
            self._kill_call = None
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._kill_waiters.append(d)
        return d

    # -- internals -----------------------------------------------------------------------

    def _time_is_up(self) -> None:
        self._timeout_call = None
        self.timed_out = True
        self.log.info(
            "{event} job={job_id} pid={pid} timeout={timeout}",
            event="job.timeout",
            job_id=self.id,
            pid=self.pid,
            timeout=self.timeout,
        )
        self.stop(self._timeout_grace)

    def _kill(self) -> None:
        """The grace is over: KILL the group, even if the leader is gone (children linger)."""
        self._kill_call = None
        self.log.info(
            "{event} job={job_id} pid={pid} leader_ended={ended}",
            event="job.kill",
            job_id=self.id,
            pid=self.pid,
            ended=self.ended,
        )
        self._signal(signal.SIGKILL)
        waiters, self._kill_waiters = self._kill_waiters, []
        for d in waiters:
            d.callback(None)

    def _signal(self, signum: int) -> None:
        if self.pid is None:
            return
        try:
            self._signal_group(self, signum)
        except ProcessLookupError:
            pass  # the whole group is gone already
        except OSError:
            self.log.failure(
                "{event} job={job_id} pid={pid} signal={signum}",
                event="job.signal_failed",
                job_id=self.id,
                pid=self.pid,
                signum=signum,
            )

    def _group_alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            self._signal_group(self, 0)
        except OSError:
            return False
        return True

    def _process_ended(self, reason: Failure) -> None:
        """From the protocol, exactly once: map how the process ended to the job's state."""
        if self._spawning:
            self._early_end = reason
            return
        if self.ended:
            return
        if self.pid is None:
            self.pid = self.protocol.pid
        value = reason.value
        self.state = STOPPED if self._stopping else EXITED
        if isinstance(value, ProcessTerminated) and value.exitCode is None and value.signal is None:
            # The transport could not learn the exit status (reaped by someone else).
            self.state = LOST
            self.error = "the process ended but its exit status was lost"
        elif isinstance(value, ProcessTerminated):
            self.exit_code = value.exitCode
            self.signal = signal_name(value.signal) if value.signal is not None else None
        elif isinstance(value, ProcessDone):
            self.exit_code = 0
        else:
            self.error = f"process ended unexpectedly: {value}"
        self._cancel_timeout()
        # A pending KILL stays armed: it also sweeps children left in the group.
        self.log.info(
            _as_format(f"job.ended job={self.id} owner={self.owner} pid={self.pid}"
                       f" state={self.state} exit_code={self.exit_code} signal={self.signal}"
                       f" timed_out={self.timed_out}"),
            event="job.ended",
            job_id=self.id,
            owner=self.owner,
            pid=self.pid,
            state=self.state,
            exit_code=self.exit_code,
            signal=self.signal,
            timed_out=self.timed_out,
        )
        self._finish()

    def _finish(self) -> None:
        self.ended_at = iso8601(self._reactor.seconds())
        self._on_ended(self)
        observers, self._observers = self._observers, []
        if observers:  # most jobs end unwatched: no record to build then
            record = self.record()
            for d in observers:
                d.callback(record)

    def _cancel_timeout(self) -> None:
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None

    def __repr__(self) -> str:
        return f"<Job {self.id} pid={self.pid} state={self.state}>"


class JobManager(service.Service):
    """Starts, finds and stops jobs; on shutdown stops them all and waits for them."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        log_store: LogStore,
        grace: float = 5.0,
        spawner: Spawner = spawn,
        base_env: dict[str, str] | None = None,
        killpg: Callable[[int, int], None] = os.killpg,
        store: JobStore | None = None,
        spare_logs: SpareLogDirs | None = None,
    ) -> None:
        self._reactor = reactor
        self._log_store = log_store
        self._spare_logs = spare_logs
        self.grace = grace
        self._spawner = spawner
        self._base_env = dict(base_env) if base_env is not None else daemon_base_env()
        self._killpg = killpg
        self._store: JobStore = store if store is not None else MemoryStore()
        self._shutting_down = False

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        self._log_store.prepare()
        soft, hard = raise_nofile_limit()
        self.log.info("{event} nofile={soft}/{hard}", event="jobs.limits", soft=soft, hard=hard)
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop every running job (TERM, then KILL after the grace) and fire once all have
        ended and no KILL sweep is left pending."""
        self._shutting_down = True
        super().stopService()
        return Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        running = self.jobs(running_only=True)
        if running:
            self.log.info("{event} count={count}", event="jobs.stopping_all", count=len(running))
            await DeferredList([self.stop(job) for job in running], consumeErrors=True)
        await DeferredList([job.settle() for job in self._store.newest_first()],
                           consumeErrors=True)

    # -- requests ------------------------------------------------------------------------

    def start(
        self,
        owner: str,
        command: str,
        args: list[str],
        env: list[str] | None = None,
        dir: str | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Start a job.  Anything wrong with the request or the spawn gives a job in state
        ``failed`` with its error, never an exception (the record is the answer)."""
        if self._shutting_down:
            raise errors.Unavailable("the daemon is shutting down")
        job_id = str(uuid.uuid4())
        started = self._reactor.seconds()
        cwd = os.path.abspath(dir) if dir is not None else os.getcwd()
        log_dir = self._log_store.dir_for(job_id, started)
        job = Job(
            self._reactor,
            id=job_id,
            owner=owner,
            command=command,
            args=list(args),
            dir=cwd,
            log_dir=log_dir,
            started=started,
            timeout=timeout,
            timeout_grace=self.grace,
            signal_group=self._signal_group,
            on_ended=self._job_ended,
        )
        self._store.add(job)
        try:
            # Created and opened once (ahead of time when a spare is ready): these
            # descriptors become the child's stdout/stderr.
            fds = self._spare_logs.take(log_dir) if self._spare_logs is not None else None
            out, err = fds if fds is not None else self._log_store.create_at(log_dir)
        except OSError as e:
            job.fail(f"cannot create job logs in {job.log_dir}: {e.strerror or e}")
            return job
        try:
            try:
                environment = self._environment(job_id, env)
                _check_request(args, timeout)
                check_directory(cwd)
                job.executable = resolve_program(command, environment.get("PATH", ""), cwd)
            except (SpawnError, ValueError, TypeError) as e:
                job.fail(str(e))
                return job
            job.spawning()
            try:
                self._spawner(
                    self._reactor,
                    job.protocol,
                    job.executable,
                    [command, *args],
                    environment,
                    cwd,
                    out,
                    err,
                )
            except OSError as e:
                job.fail(f"cannot execute {job.executable}: {e.strerror or e}")
                return job
            except Exception:  # noqa: BLE001 (logged with its traceback below)
                # A bug, not a request problem: keep the traceback, still end the record.
                self.log.failure("{event} job={job_id}", event="job.spawn_bug", job_id=job_id)
                job.fail("internal error while starting the job")
                return job
        finally:
            os.close(out)
            os.close(err)
        job.spawned()
        if not job.ended:
            self._store.running(job)
        return job

    def stop(self, job: Job, grace: float | None = None) -> Deferred[JobRecord]:
        """TERM the job's process group, KILL it after ``grace`` (default: the manager's);
        fires with the final record.  Stopping an ended job returns its record at once."""
        if grace is None:
            grace = self.grace
        if not (grace >= 0 and math.isfinite(grace)):
            raise errors.BadRequest("grace must be a non-negative number of seconds")
        return job.stop(grace)

    def get(self, job_id: str) -> Job:
        """The job with this id, or NotFound."""
        return self._store.get(job_id)

    def find(self, ref: str | int) -> Job:
        """By id, or by pid: the running job with that pid, else the newest that had it."""
        if type(ref) is str and not ref.isdecimal():  # an id: the usual case
            return self._store.get(ref)
        pid: int | None = None
        if isinstance(ref, int) and not isinstance(ref, bool):
            pid = ref
        elif isinstance(ref, str) and ref.isdecimal() and ref.isascii():
            pid = int(ref)
        if pid is None:
            return self.get(ref)  # type: ignore[arg-type]
        return self._store.by_pid(pid)

    def jobs(self, running_only: bool = False) -> list[Job]:
        """Every job this daemon has run, newest first."""
        return self._store.newest_first(running_only)

    # -- internals -----------------------------------------------------------------------

    def _environment(self, job_id: str, env: list[str] | None) -> dict[str, str]:
        environment = dict(self._base_env)
        environment.update(parse_env(env or []))
        # Set last so a job can always trust it.
        environment[JOB_ID_VAR] = job_id
        return environment

    def _signal_group(self, job: Job, signum: int) -> None:
        """Signal the job's process group, unless its pid now belongs to another running job
        (a late KILL sweep after the leader was reaped and the pid reused)."""
        pid = job.pid
        if pid is None:
            raise ProcessLookupError(f"job {job.id} has no process")
        holder = self._store.running_with_pid(pid)
        if holder is not None and holder is not job:
            raise ProcessLookupError(f"pid {pid} now belongs to job {holder.id}")
        self._killpg(pid, signum)

    def _job_ended(self, job: Job) -> None:
        self._store.ended(job)


def _as_format(text: str) -> str:
    """Already-rendered text as a twisted.logger format with no fields in it.

    For the two events every job logs (``job.started``, ``job.ended``): twistd's text
    observer renders a format through ``string.Formatter`` one field at a time, ~8 us per
    event for these; text rendered once here by an f-string costs it a scan for braces.
    The event keeps its keys (event, job_id, owner, pid, ...) for observers and tests; the
    line reads exactly as the keyword-field format rendered it.
    """
    return text.replace("{", "{{").replace("}", "}}")


def _check_request(args: Sequence[str], timeout: float | None) -> None:
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"bad argument {arg!r}: expected a string")
        if "\0" in arg:
            raise ValueError(f"bad argument {arg!r}: contains a NUL byte")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError("timeout must be a number of seconds")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds")
