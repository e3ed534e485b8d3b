"""The job manager: starts, finds and stops jobs, and stops them all at shutdown."""

from __future__ import annotations

import math
import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from jobworker.jobs.blockdev import BlockDevices
from jobworker.jobs.credentials import Credentials, CredentialsError, acting_as
from jobworker.jobs.environment import daemon_base_env, job_environment
from jobworker.jobs.job import Job
from jobworker.jobs.jobcgroup import JobCgroup
from jobworker.jobs.joblimits import NAMES as LIMIT_NAMES
from jobworker.jobs.joblimits import JobLimits, LimitPolicy
from jobworker.jobs.logs import LogStore
from jobworker.jobs.namespaces import effective, helper_command
from jobworker.jobs.observer import JobObserver, Unobserved
from jobworker.jobs.process import JobProcessProtocol, spawn
from jobworker.jobs.procstat import is_running, ticks_now
from jobworker.jobs.programs import SpawnError, check_directory, resolve_program
from jobworker.jobs.recovery import sort_out, watch_adopted
from jobworker.jobs.reserve import DiskReserve
from jobworker.jobs.retention import remove_log_dirs
from jobworker.jobs.rlimits import raise_nofile_limit
from jobworker.jobs.scheduler import QueuePolicy, Scheduler, dependency_failed
from jobworker.jobs.sql import Queued, Unfinished
from jobworker.jobs.store import JobStore, ListQuery, MemoryStore, Page
from jobworker.jobs.stored import StoredJob
from jobworker.wire import errors
from jobworker.wire.codec import decode, encode
from jobworker.wire.params import START_ARGS, START_TIMEOUT
from jobworker.wire.record import DEFAULT_QUEUE, EXITED, QUEUED, RUNNING, JobRecord
from jobworker.wire.timestamps import iso8601

#: Queued jobs whose cgroups are made ahead of their start.
AHEAD = 4


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

    def prepare(self, job_id: str) -> Deferred[None]:
        """Make ``job_id``'s cgroup off the reactor thread, for a ``take`` soon."""
        ...

    def adopt(self, job_id: str) -> JobCgroup | None:
        """The cgroup an earlier daemon made for ``job_id``, if it is still there."""
        ...

    def unused(self, job_id: str) -> None:
        """Job ``job_id`` ended without taking the cgroup made for it: let it go."""
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
        observer: JobObserver | None = None,
        devices: BlockDevices | None = None,
        max_running: int | None = None,
        queue_policy: Callable[[], QueuePolicy] | None = None,
    ) -> None:
        self._reactor = reactor
        #: Told of jobs starting and ending (the daemon's metrics).
        self.observer: JobObserver = observer if observer is not None else Unobserved()
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
        self._devices = devices if devices is not None else BlockDevices()
        self._shutting_down = False
        # Every job some timer or caller still holds: at shutdown, the ones with a KILL
        # sweep pending are waited for (the store may have let ended ones go).
        self._held: weakref.WeakSet[Job] = weakref.WeakSet()
        self._own_ids = (os.geteuid(), os.getegid())
        # Jobs whose logs someone is reading: never removed meanwhile (job id -> readers).
        self._readers: dict[str, int] = {}
        # Queued jobs whose cgroups are made ahead (``_prepare_ahead``): job id -> fired
        # once made.  A take waits for it (else it would make the same cgroup twice).
        self._prepared: dict[str, Deferred[None]] = {}
        # The names of queued and running jobs, unique per owner: (owner, name) -> job.
        self._names: dict[tuple[str, str], Job] = {}
        #: Which admitted job runs when: ``--max-running``, the policy's queues and quotas.
        self.scheduler = Scheduler(self._dequeued, max_running,
                                   queue_policy if queue_policy is not None else QueuePolicy)

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        self._own_ids = (os.geteuid(), os.getegid())  # after twistd's -u/-g, if any
        self._log_store.prepare()
        soft, hard = raise_nofile_limit()
        self.log.info("{event} nofile={soft}/{hard}", event="jobs.limits", soft=soft, hard=hard)
        self._recover()
        super().startService()

    def _recover(self) -> None:
        """Reconcile the jobs an earlier daemon left running with the machine: record the
        gone ones ``lost``, adopt the others."""
        unfinished = self._store.open()
        queued = self._store.queued()
        # A queued job with a log folder was leaving the queue when the daemon stopped
        # (its folder is made before its spawn, its new state committed after): like a
        # job committed running without a pid, it is looked for by its id, never run
        # again.
        launching = self._log_store.made_for({q.id for q in queued})
        if launching:
            unfinished = [*unfinished, *(_launching(q, launching[q.id]) for q in queued
                                         if q.id in launching)]
            queued = [q for q in queued if q.id not in launching]
        if not unfinished:
            self._requeue(queued)
            self.scheduler.pump()
            return
        lost, alive = sort_out(unfinished, self._reactor.seconds())
        adopted = [job for job in (self._adopt(u) for u in alive) if job is not None]
        gone = [u for u in alive if u.id not in {job.id for job in adopted}]
        if gone:
            more, _ = sort_out(gone, self._reactor.seconds(), lambda *_: False,
                               lambda _: None)
            lost.extend(more)
        if lost:
            self._store.record_lost(lost)
        self.log.info("{event} lost={lost} adopted={adopted}", event="jobs.recovered",
                      lost=len(lost), adopted=len(adopted))
        self._requeue(queued)  # after adopting: a queued job may wait for an adopted one
        self.scheduler.pump()  # the slots adopted jobs left free

    def _requeue(self, queued: list[Queued]) -> None:
        """Put the jobs an earlier daemon left queued back in their queues, in order."""
        count = 0
        for q in queued:
            record, launch = decode(q.record), q.launch
            job = Job(
                self._reactor, id=record["id"], owner=record["owner"],
                command=record["command"], args=list(record["args"]), dir=record["dir"],
                log_dir=None, started=self._reactor.seconds(),
                timeout=record.get("timeout"), timeout_grace=self.grace,
                signal_group=self._signal_group, on_ended=self._job_ended,
            )
            job.state = QUEUED
            job.queued_at = record.get("queued_at")
            job.queue = record.get("queue") or DEFAULT_QUEUE
            job.priority = record.get("priority") or 0
            job.isolate = record.get("isolate")
            job.limits = record.get("limits")
            job.launch_spec = launch
            job.role = _unpack_launch(launch)[2] if launch is not None else None
            job.after = record.get("after")
            job.name, job.labels = record.get("name"), record.get("labels")
            self._held.add(job)
            self._store.requeue(job)
            self._name(job)
            deps: list[Any] = []
            failed = None
            for dep_id in job.after or []:
                try:
                    deps.append(self._store.get(dep_id))
                except errors.NotFound:
                    failed = f"dependency {dep_id} was forgotten before it could run"
                    break
            waiting_for, ended_badly = _dependencies(deps) if failed is None else ([], None)
            failed = failed or ended_badly
            if failed is not None:
                job.cancel(failed)
            elif waiting_for:
                self.scheduler.hold(job, waiting_for)
            else:
                self.scheduler.requeue(job)
            count += 1
        if count:
            self.log.info("{event} queued={queued}", event="jobs.requeued", queued=count)

    def _adopt(self, u: Unfinished) -> Job | None:
        """Take over a running job of an earlier daemon, or None if it ended meanwhile."""
        pid = u.pid
        assert pid is not None
        record = decode(u.record)
        job = Job(
            self._reactor, id=u.id, owner=record["owner"], command=record["command"],
            args=list(record["args"]), dir=record["dir"], log_dir=record["log_dir"],
            started=u.started, timeout=record.get("timeout"), timeout_grace=self.grace,
            signal_group=self._signal_group, on_ended=self._job_ended,
        )
        job.spawn_ticks = (u.proc_start or 0, u.proc_start_hi or 0)
        job.uid, job.gid = record.get("uid"), record.get("gid")
        job.isolate = record.get("isolate")
        job.limits = record.get("limits")  # what its cgroup still applies
        # The pidfd first, then the check: once it is open, the pid cannot name another
        # process, so a process that passes the check is the one being watched.
        watching = watch_adopted(self._reactor, pid, job.protocol.processEnded,
                                 lambda: is_running(pid, u.proc_start, u.proc_start_hi))
        if not watching:
            return None
        job.adopt(pid)
        # Its cgroup, named by its id, holds every process it made: stop ends them all.
        cgroup = self._cgroups.adopt(job.id) if self._cgroups is not None else None
        if cgroup is not None:
            job.attach_cgroup(cgroup)
        job.queue = record.get("queue") or DEFAULT_QUEUE
        job.priority = record.get("priority") or 0
        job.queued_at = record.get("queued_at")
        job.name, job.labels = record.get("name"), record.get("labels")
        self._held.add(job)
        self._store.adopt(job)
        self.observer.job_adopted(job)
        self._name(job)
        self.scheduler.adopt(job)
        self.log.info("{event} job={job_id} pid={pid} owner={owner} cgroup={cgroup}",
                      event="job.adopted", job_id=job.id, pid=job.pid, owner=job.owner,
                      cgroup=cgroup is not None)
        return job

    def stopService(self) -> Deferred[None]:
        """Stop every running job (TERM, then KILL after the grace) and fire once all have
        ended and no KILL sweep is left pending."""
        self._shutting_down = True
        self.scheduler.freeze()  # queued jobs stay queued, in the table, for the next daemon
        super().stopService()
        return Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        running = self.jobs(running_only=True)
        if running:
            self.log.info("{event} count={count}", event="jobs.stopping_all", count=len(running))
            await DeferredList([self.stop(job) for job in running], consumeErrors=True)
        await DeferredList([job.settle() for job in list(self._held)], consumeErrors=True)
        await self._store.close()

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
        request: tuple[str, bytes] | None = None,
        isolate: Sequence[str] = (),
        memory: int | None = None,
        cpu: float | None = None,
        pids: int | None = None,
        io_read: int | None = None,
        io_write: int | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        role: str | None = None,
        after: Sequence[Job | StoredJob] = (),
        name: str | None = None,
        labels: Sequence[str] = (),
    ) -> Job:
        """Start a job (with ``job_id`` from ``new_id``, or a new one): ``admit`` then
        ``launch`` at once.  Anything wrong with the request or the spawn gives a job in
        state ``failed`` with its error, never an exception (the record is the answer);
        only a daemon that takes no new job (shutting down, short of disk) raises
        L{errors.Unavailable}.  ``request``: the caller's retry key and the digest of what
        it asked (see ``by_request``).  A job the scheduler holds back is ``queued``."""
        job = self.admit(owner, command, args, dir, timeout, job_id, request, isolate,
                         memory, cpu, pids, io_read, io_write, queue=queue,
                         priority=priority, role=role, env=env, after=after, name=name,
                         labels=labels)
        if job.state == RUNNING:  # not queued, nor cancelled at once
            self.launch(job, env)
        return job

    def admit(
        self,
        owner: str,
        command: str,
        args: list[str],
        dir: str | None = None,
        timeout: float | None = None,
        job_id: str | None = None,
        request: tuple[str, bytes] | None = None,
        isolate: Sequence[str] = (),
        memory: int | None = None,
        cpu: float | None = None,
        pids: int | None = None,
        io_read: int | None = None,
        io_write: int | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        role: str | None = None,
        env: list[str] | None = None,
        creds: Credentials | None = None,
        after: Sequence[Job | StoredJob] = (),
        name: str | None = None,
        labels: Sequence[str] = (),
    ) -> Job:
        """A new job in the table, not started yet (in new namespaces when ``isolate``
        names some: ``jobworker.jobs.namespaces``).  A durable caller awaits ``pending``
        before ``launch``: then a crash can never leave a process the table has not
        heard of (a restarted daemon finds it by its job id, see ``recovery``), and a
        retried start finds its job instead of running the program again.

        If the scheduler has no slot for it, the job is ``queued`` instead, with ``env``
        and ``creds`` kept (in the table too) for its launch, which the manager makes
        once a slot frees: the caller then must not ``launch`` it.  A start the
        scheduler refuses (unknown queue, a quota) raises.  ``after``: jobs it waits for
        (queued until all have exited 0; cancelled if one ends otherwise).  ``name``:
        unique among the owner's queued and running jobs (else L{errors.BadRequest});
        ``labels``: ``key=value`` each."""
        self.check_admission()
        if name is not None:
            taken = self._names.get((owner, name))
            if taken is not None:
                raise errors.BadRequest(f"you have a {taken.state} job named {name!r} "
                                        f"already ({taken.id}): names are unique among "
                                        "your queued and running jobs")
        self.scheduler.check(owner, role, queue, priority)
        # Above a maximum: refused (BadRequest naming it), not a failed job.
        limits = self._limits.resolve(memory, cpu, pids, io_read, io_write)
        job = self._new_job(job_id or self.new_id(), owner, command, args, dir, timeout,
                            request)
        job.isolate = list(effective(isolate)) or None
        if limits:
            job.limits = limits.wire()
        job.queue, job.priority, job.role = queue, priority, role
        job.state = QUEUED
        job.after = [dep.id for dep in after] or None
        job.name = name
        job.labels = dict(label.partition("=")[::2] for label in labels) or None
        waiting_for, failed = _dependencies(after)
        try:
            placed = not waiting_for and failed is None and self.scheduler.place(job)
        except errors.JobWorkerError:
            if self._cgroups is not None:
                self._cgroups.unused(job.id)
            raise
        if placed:
            job.state = RUNNING
            job.log_dir = self._log_store.dir_for(job.id, job.started)
        else:
            job.queued_at = iso8601(job.started)  # its log folder is named when it starts
            job.launch_spec = _pack_launch(env, creds, role)
            # A cgroup made ahead for its id (new_id) is kept for its start: let go and
            # made again, its removal could come after the new one was made.
            self._prepare_ahead()
        self._held.add(job)
        self._store.add(job)
        self._name(job)
        if failed is not None:
            job.cancel(failed)
        elif waiting_for:
            self.scheduler.hold(job, waiting_for)
        return job

    def launch(self, job: Job, env: list[str] | None = None,
               creds: Credentials | None = None) -> None:
        """Spawn an admitted job (as ``creds``: None, the daemon's own user); any problem
        fails it with its reason."""
        if self._shutting_down:
            job.fail("the daemon is shutting down")
            return
        assert job.log_dir is not None  # named by admit, or when it left the queue
        if job.queued_at is not None:
            # From the queue: it starts now, after the commit of its leaving the queue
            # (its log folder keeps the name given then).
            job.started = self._reactor.seconds()
        try:
            # Created and opened once (ahead of time when a spare is ready): these
            # descriptors become the child's stdout/stderr.
            fds = self._spare_logs.take(job.log_dir) if self._spare_logs is not None else None
            out, err = fds if fds is not None else self._log_store.create_at(job.log_dir)
        except OSError as e:
            job.fail(f"cannot create job logs in {job.log_dir}: {e.strerror or e}")
            return
        try:
            self._launch(job, env, out, err, creds)
        finally:
            os.close(out)
            os.close(err)
        if job.pid is not None:  # spawned, though it may have ended already
            self.observer.job_started(job)
        if not job.ended:
            self._store.running(job)
        job.fire_started()

    def _dequeued(self, job: Job) -> None:
        """The scheduler gave a queued job its slot: record it running (pid null, its log
        folder named now) and launch it, without waiting for that commit: its log folder
        is made before it is spawned, and a restarted daemon treats a queued job with a
        log folder as one being launched (``_recover``), so nothing is launched twice."""
        spec = job.launch_spec
        env, creds, _ = _unpack_launch(spec)
        job.launch_spec = None
        job.state = RUNNING
        job.started = self._reactor.seconds()
        job.log_dir = self._log_store.dir_for(job.id, job.started)
        self._store.changed(job)
        # Its cgroup was made ahead (else it is made now, in a thread: waited for).
        prepared = self._prepared.pop(job.id, None)
        if self._cgroups is not None and prepared is None:
            prepared = self._cgroups.prepare(job.id)
        self._prepare_ahead()

        def go(_: object = None) -> None:
            if self._shutting_down:
                # Stopping while its cgroup was made: it never ran, so it stays queued
                # for the next daemon (no log folder was made).
                job.state, job.log_dir, job.launch_spec = QUEUED, None, spec
                self._store.changed(job)
                return
            self.launch(job, env, creds)

        if prepared is None or prepared.called:
            go()
            return
        prepared.addCallback(go).addErrback(
            lambda f: self.log.failure("{event} job={job_id}", f, event="job.launch_bug",
                                       job_id=job.id))

    def _prepare_ahead(self) -> None:
        """Make the cgroups of the next few queued jobs now, off the reactor thread, so
        that a slot freeing does not wait for one."""
        if self._cgroups is None or not self.scheduler.queued:
            return
        for job in self.scheduler.upcoming(AHEAD):
            if job.id not in self._prepared:
                self._prepared[job.id] = self._cgroups.prepare(job.id)

    @property
    def queued(self) -> int:
        """How many jobs wait in the queues now."""
        return self.scheduler.queued

    def new_id(self) -> str:
        """A fresh job id (one whose cgroup is made already, when one is ready and the
        job is likely to start at once rather than queue)."""
        if self._cgroups is not None and not self.scheduler.busy:
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
        if self._store.short is not None:
            raise errors.Unavailable(self._store.short)

    def stop(self, job: Job | StoredJob, grace: float | None = None) -> Deferred[JobRecord]:
        """TERM the job's process group, KILL it after ``grace`` (default: the manager's);
        fires with the final record.  Stopping an ended job returns its record at once."""
        if grace is None:
            grace = self.grace
        if not (grace >= 0 and math.isfinite(grace)):
            raise errors.BadRequest("grace must be a non-negative number of seconds")
        return job.stop(grace)

    def reading(self, job_id: str, change: int) -> None:
        """Count a reader of ``job_id``'s logs in (+1) or out (-1)."""
        n = self._readers.get(job_id, 0) + change
        if n > 0:
            self._readers[job_id] = n
        else:
            self._readers.pop(job_id, None)

    def being_read(self) -> frozenset[str]:
        """Jobs whose logs are being read now: retention and forget spare them."""
        return frozenset(self._readers)

    async def forget(self, job: Job | StoredJob) -> None:
        """Remove an ended job: its record, then its log folder."""
        if not job.ended:
            raise errors.BadRequest(f"job {job.id} is running: stop it first")
        if job.id in self._readers:
            raise errors.Unavailable(f"job {job.id}'s log is being read: try again later")
        pending = self._store.pending()
        if pending is not None:
            await pending
        await self._store.forget(job.id)
        await deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                remove_log_dirs, self._log_store.root, [job.log_dir])
        self.log.info("{event} job={job_id}", event="job.forgotten", job_id=job.id)

    def get(self, job_id: str) -> Job | StoredJob:
        """The job with this id, or NotFound."""
        return self._store.get(job_id)  # type: ignore[no-any-return]

    def by_request(self, owner: str, request_id: str) -> tuple[Job | StoredJob, bytes] | None:
        """``owner``'s job started with ``request_id``, and the digest of that start."""
        return self._store.by_request(owner, request_id)

    def page(self, query: ListQuery) -> Page:
        """One page of jobs, newest first (await ``pending`` first for a current one)."""
        return self._store.page(query)

    def pending(self) -> Deferred[None] | None:
        """Fires once every change so far is durable; None if nothing is waiting."""
        return self._store.pending()

    def by_name(self, owner: str, name: str) -> Job | StoredJob:
        """``owner``'s job named ``name``: its queued or running one, else its newest."""
        job = self._names.get((owner, name))
        if job is not None:
            return job
        return self._store.by_name(owner, name)  # type: ignore[no-any-return]

    def find(self, ref: str | int) -> Job | StoredJob:
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
        return self._store.by_pid(pid)  # type: ignore[no-any-return]

    def ids_by_prefix(self, prefix: str, owner: str | None, limit: int = 2) -> list[str]:
        """Up to ``limit`` ids that start with ``prefix``, of ``owner``'s jobs (None: all)."""
        return self._store.ids_by_prefix(prefix, owner, limit)

    def jobs(self, running_only: bool = False) -> list[Any]:
        """Every job in the table (or every running one), newest first."""
        return self._store.running_jobs() if running_only else self._store.newest_first()

    # -- internals -----------------------------------------------------------------------

    def _new_job(self, job_id: str, owner: str, command: str, args: list[str],
                 dir: str | None, timeout: float | None,
                 request: tuple[str, bytes] | None = None) -> Job:
        """A new job, not started yet, its log folder not named yet (``admit`` names it
        if the job starts at once)."""
        started = self._reactor.seconds()
        job = Job(
            self._reactor,
            id=job_id,
            owner=owner,
            command=command,
            args=list(args),
            dir=os.path.abspath(dir) if dir is not None else os.getcwd(),
            log_dir=None,
            started=started,
            timeout=timeout,
            timeout_grace=self.grace,
            signal_group=self._signal_group,
            on_ended=self._job_ended,
        )
        job.request = request
        return job

    def _launch(self, job: Job, env: list[str] | None, out: int, err: int,
                creds: Credentials | None = None) -> None:
        """Check what the job asks for, find its program and spawn it on ``out`` and
        ``err`` as ``creds``; a problem fails the job with its reason."""
        try:
            base = self._base_env
            if creds is not None:
                base = {**base, "HOME": creds.home, "USER": creds.user,
                        "LOGNAME": creds.user}
            environment = job_environment(base, job.id, env or [])
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
        earliest = ticks_now()
        executable, argv, run_as = job.executable, [job.command, *job.args], creds
        if job.isolate:
            # The helper makes the namespaces as root, then takes ``creds`` itself.
            executable, argv, environment = helper_command(job.isolate, executable, argv,
                                                           environment, creds)
            run_as = None
        try:
            if cgroup is None:
                with acting_as(run_as):  # this thread only, and back at once
                    self._spawner(self._reactor, job.protocol, executable, argv,
                                  environment, job.dir, out, err)
            else:
                self._spawn_in(cgroup, job, executable, argv, environment, out, err,
                               run_as)
        except CredentialsError as e:
            job.fail(str(e))
            return
        except OSError as e:
            as_user = f" as uid {creds.uid}" if creds is not None else ""
            job.fail(f"cannot execute {job.executable} in {job.dir}{as_user}: "
                     f"{e.strerror or e}")
            return
        except Exception:  # noqa: BLE001 (logged with its traceback below)
            # A bug, not a request problem: keep the traceback, still end the record.
            self.log.failure("{event} job={job_id}", event="job.spawn_bug", job_id=job.id)
            job.fail("internal error while starting the job")
            return
        job.spawn_ticks = (earliest, ticks_now())
        job.uid, job.gid = (creds.uid, creds.gid) if creds is not None else self._own_ids
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
            limits = JobLimits(**{n: job.limits.get(n) for n in LIMIT_NAMES})
            try:
                cgroup.set_limits(limits.memory, limits.cpu, limits.pids)
                if limits.io:
                    # The disks of its working directory and of its logs (the state
                    # directory): none for a file system on no block device.
                    devices = self._devices.disks_of([job.dir, self._log_store.root])
                    cgroup.set_io(devices, limits.io_read, limits.io_write)
                    job.limits = {**job.limits, "io_devices": devices}
            except OSError as e:
                job.fail(f"cannot set the job's limits: {e.strerror or e}")
                return None
            if limits.memory is not None:
                job.watch_memory()
        return cgroup

    def _spawn_in(self, cgroup: JobCgroup, job: Job, executable: str, argv: list[str],
                  environment: dict[str, str], out: int, err: int,
                  run_as: Credentials | None = None) -> None:
        """Spawn with this (the reactor) thread inside the job's cgroup, so the child
        starts there, before its first instruction; then move the thread back."""
        assert job.executable is not None
        try:
            cgroup.enter()
        except OSError as e:
            self._leave(cgroup, job)
            raise OSError(e.errno, f"cannot enter the job's cgroup: {e.strerror}") from e
        try:
            # Into the cgroup as root, then the job's credentials: both for this thread.
            with acting_as(run_as):
                self._spawner(self._reactor, job.protocol, executable, argv, environment,
                              job.dir, out, err)
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
        if job.adopted and not is_running(pid, *job.spawn_ticks or (None, None)):
            # Not our child: once its leader is gone, its pid may name anyone's process.
            raise ProcessLookupError(f"adopted job {job.id} has ended")
        self._killpg(pid, signum)

    def _name(self, job: Job) -> None:
        if job.name is not None and not job.ended:
            self._names[job.owner, job.name] = job

    def _unused(self, _: object, job_id: str) -> None:
        if self._cgroups is not None:
            self._cgroups.unused(job_id)

    def _job_ended(self, job: Job, again: bool) -> None:
        """``job`` ended; ``again``: its cgroup, busy when it ended, has emptied since and
        the record has its final usage (only the record is written again)."""
        self._store.ended(job)
        if again:
            return
        if job.name is not None and self._names.get((job.owner, job.name)) is job:
            del self._names[job.owner, job.name]
        self.observer.job_ended(job)
        if (self._cgroups is not None and job.cgroup is None and job.usage is None
                and not job.adopted):
            # Ended without taking the cgroup made for its id (it failed to start, or was
            # cancelled in the queue): a job that had one has its final usage now.
            made = self._prepared.pop(job.id, None)
            if made is None or made.called:
                self._cgroups.unused(job.id)
            else:  # being made: let it go once it is
                made.addCallback(self._unused, job.id)
        self.scheduler.ended(job)  # its slot (or place in the queue) goes to the next


def _launching(q: Queued, log_dir: str) -> Unfinished:
    """A queued row whose launch had begun, as a job recorded running without a pid."""
    record = decode(q.record)
    record.update(state=RUNNING, log_dir=log_dir)
    return Unfinished(q.seq, q.id, None, None, None, q.started, encode(record))


def _dependencies(after: Sequence[Any]) -> tuple[list[Any], str | None]:
    """The jobs of ``after`` still to end, and why the dependant is cancelled at once
    (one ended other than exiting 0), if so."""
    waiting = []
    for dep in after:
        if not dep.ended:
            waiting.append(dep)
        elif not (dep.state == EXITED and dep.exit_code == 0):
            return [], dependency_failed(dep)
    return waiting, None


def _pack_launch(env: list[str] | None, creds: Credentials | None,
                 role: str | None) -> bytes:
    """What a queued job's launch needs, for the table: it must survive a restart."""
    who = None if creds is None else [creds.uid, creds.gid, list(creds.groups), creds.user,
                                      creds.home]
    return encode({"env": list(env or []), "creds": who, "role": role})


def _unpack_launch(packed: bytes | None
                   ) -> tuple[list[str] | None, Credentials | None, str | None]:
    if packed is None:
        return None, None, None
    spec = decode(packed)
    who = spec.get("creds")
    creds = None if who is None else Credentials(who[0], who[1], tuple(who[2]), who[3],
                                                 who[4])
    return spec.get("env"), creds, spec.get("role")
