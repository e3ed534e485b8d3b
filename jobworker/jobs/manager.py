"""The job manager: starts, finds and stops jobs, and stops them all at shutdown."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from jobworker.jobs.environment import daemon_base_env, job_environment
from jobworker.jobs.job import Job
from jobworker.jobs.jobcgroup import JobCgroup
from jobworker.jobs.joblimits import JobLimits, LimitPolicy
from jobworker.jobs.logs import LogStore
from jobworker.jobs.process import JobProcessProtocol, spawn
from jobworker.jobs.programs import SpawnError, check_directory, resolve_program
from jobworker.jobs.reserve import DiskReserve
from jobworker.jobs.rlimits import raise_nofile_limit
from jobworker.jobs.store import JobStore, MemoryStore
from jobworker.wire import errors
from jobworker.wire.params import START_ARGS, START_TIMEOUT
from jobworker.wire.record import JobRecord


class SpareLogDirs(Protocol):
    """Log directories made ahead of time; ``jobworker.jobs.logpool.LogDirPool`` is the real one.
    Without one, JobManager makes each job's directory when the job starts."""

    def take(self, log_dir: str) -> tuple[int, int] | None:
        """Rename a spare to ``log_dir`` and hand over its (stdout, stderr) descriptors,
        or None when none is ready."""
        ...


class JobCgroups(Protocol):
    """Each job's own cgroup; ``jobworker.jobs.cgpool.CgroupPool`` is the real one.  Without
    one, jobs run in the daemon's cgroups and stop signals their process group only."""

    def take(self, job_id: str) -> JobCgroup | None:
        """The cgroup for job ``job_id``, or None when cgroups are off; OSError when it
        cannot be made."""
        ...

    def new_id(self) -> str | None:
        """A fresh job id whose cgroup is ready, or None."""
        ...


class Spawner(Protocol):
    """What JobManager needs to start a process; ``jobworker.jobs.process.spawn`` is the real one."""

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
        reserve: DiskReserve | None = None,
        cgroups: JobCgroups | None = None,
        limits: LimitPolicy | None = None,
    ) -> None:
        self._reactor = reactor
        self._log_store = log_store
        self._spare_logs = spare_logs
        self.grace = grace
        self._spawner = spawner
        self._base_env = dict(base_env) if base_env is not None else daemon_base_env()
        self._killpg = killpg
        self._store: JobStore = store if store is not None else MemoryStore()
        self._reserve = reserve
        self._cgroups = cgroups
        self._limits = limits if limits is not None else LimitPolicy()
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
        job_id: str | None = None,
        memory: int | None = None,
        cpu: float | None = None,
        pids: int | None = None,
    ) -> Job:
        """Start a job (with ``job_id`` from ``new_id``, or a new one).  Anything wrong
        with the request or the spawn gives a job in state ``failed`` with its error, never
        an exception (the record is the answer); only a daemon that takes no new job
        (shutting down, short of disk) raises L{errors.Unavailable}."""
        self.check_admission()
        # Above a maximum: refused (BadRequest naming it), not a failed job.
        limits = self._limits.resolve(memory, cpu, pids)
        job = self._new_job(job_id or self.new_id(), owner, command, args, dir, timeout)
        if limits:
            job.limits = limits.wire()
        try:
            # Created and opened once (ahead of time when a spare is ready): these
            # descriptors become the child's stdout/stderr.
            fds = self._spare_logs.take(job.log_dir) if self._spare_logs is not None else None
            out, err = fds if fds is not None else self._log_store.create_at(job.log_dir)
        except OSError as e:
            job.fail(f"cannot create job logs in {job.log_dir}: {e.strerror or e}")
            return job
        try:
            self._launch(job, env, out, err)
        finally:
            os.close(out)
            os.close(err)
        if not job.ended:
            self._store.running(job)
        return job

    def new_id(self) -> str:
        """A fresh job id (one whose cgroup is made already, when one is ready)."""
        if self._cgroups is not None:
            ready = self._cgroups.new_id()
            if ready is not None:
                return ready
        return str(uuid.uuid4())

    def check_admission(self) -> None:
        """Raise L{errors.Unavailable} if a new job would be refused now."""
        if self._shutting_down:
            raise errors.Unavailable("the daemon is shutting down")
        if self._reserve is not None:
            self._reserve.check()

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

    def _new_job(self, job_id: str, owner: str, command: str, args: list[str],
                 dir: str | None, timeout: float | None) -> Job:
        """A new job, in the store, not started yet."""
        started = self._reactor.seconds()
        job = Job(
            self._reactor,
            id=job_id,
            owner=owner,
            command=command,
            args=list(args),
            dir=os.path.abspath(dir) if dir is not None else os.getcwd(),
            log_dir=self._log_store.dir_for(job_id, started),
            started=started,
            timeout=timeout,
            timeout_grace=self.grace,
            signal_group=self._signal_group,
            on_ended=self._job_ended,
        )
        self._store.add(job)
        return job

    def _launch(self, job: Job, env: list[str] | None, out: int, err: int) -> None:
        """Check what the job asks for, find its program and spawn it on ``out`` and
        ``err``; a problem fails the job with its reason."""
        try:
            environment = job_environment(self._base_env, job.id, env or [])
            # The same checks the start schema makes: for callers that skip the RPC layer.
            START_ARGS("args", job.args)
            if job.timeout is not None:
                START_TIMEOUT("timeout", job.timeout)
            check_directory(job.dir)
            job.executable = resolve_program(job.command, environment.get("PATH", ""),
                                             job.dir)
        except (SpawnError, errors.BadRequest) as e:
            job.fail(e.message)
            return
        except (ValueError, TypeError) as e:
            job.fail(str(e))
            return
        cgroup = self._take_cgroup(job)
        if job.ended:
            return
        job.spawning()
        try:
            if cgroup is None:
                self._spawner(self._reactor, job.protocol, job.executable,
                              [job.command, *job.args], environment, job.dir, out, err)
            else:
                self._spawn_in(cgroup, job, environment, out, err)
        except OSError as e:
            job.fail(f"cannot execute {job.executable}: {e.strerror or e}")
            return
        except Exception:  # noqa: BLE001 (logged with its traceback below)
            # A bug, not a request problem: keep the traceback, still end the record.
            self.log.failure("{event} job={job_id}", event="job.spawn_bug", job_id=job.id)
            job.fail("internal error while starting the job")
            return
        job.spawned()


    def _take_cgroup(self, job: Job) -> JobCgroup | None:
        """Attach the job's own cgroup (if cgroups are on); failing that, fail the job:
        it never runs outside the isolation it would have had."""
        cgroup = None
        if self._cgroups is not None:
            try:
                cgroup = self._cgroups.take(job.id)
            except OSError as e:
                job.fail(f"cannot make the job's cgroup: {e.strerror or e}")
                return None
        if cgroup is not None:
            job.attach_cgroup(cgroup)
        if job.limits:
            if cgroup is None:
                job.fail("resource limits need cgroups, which this daemon runs without")
                return None
            limits = JobLimits(**job.limits)
            try:
                cgroup.set_limits(limits.memory, limits.cpu, limits.pids)
            except OSError as e:
                job.fail(f"cannot set the job's limits: {e.strerror or e}")
                return None
            if limits.memory is not None:
                job.watch_memory()
        return cgroup

    def _spawn_in(self, cgroup: JobCgroup, job: Job, environment: dict[str, str],
                  out: int, err: int) -> None:
        """Spawn with this (the reactor) thread inside the job's cgroup, so the child
        starts there, before its first instruction; then move the thread back."""
        assert job.executable is not None
        try:
            cgroup.enter()
        except OSError as e:
            self._leave(cgroup, job)
            raise OSError(e.errno, f"cannot enter the job's cgroup: {e.strerror}") from e
        try:
            self._spawner(self._reactor, job.protocol, job.executable,
                          [job.command, *job.args], environment, job.dir, out, err)
        finally:
            self._leave(cgroup, job)

    def _leave(self, cgroup: JobCgroup, job: Job) -> None:
        try:
            cgroup.leave()
        except OSError:
            # The reactor thread stays in the job's cgroup: its CPU is charged there and
            # the cgroup cannot be removed until the next spawn moves the thread again.
            self.log.failure("{event} job={job_id}", event="cgroups.leave_failed",
                             job_id=job.id)

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
