"""One job's life cycle: the TERM-then-KILL stop escalation, its run-time limit, and how
the end of its process maps to the state clients see."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python.failure import Failure

from jobworker.jobs.process import JobProcessProtocol
from jobworker.wire.codec import Encoded, encode
from jobworker.wire.record import (
    CANCELLED,
    DEFAULT_QUEUE,
    EXITED,
    FAILED,
    LOST,
    QUEUED,
    RUNNING,
    STOPPED,
    JobRecord,
    wire_map,
)
from jobworker.wire.timestamps import iso8601

if TYPE_CHECKING:
    from jobworker.jobs.jobcgroup import JobCgroup


#: Seconds after its KILL that a stop is answered even if the job's cgroup is not empty.
STUCK_AFTER = 10.0


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; real-time signals as ``SIGRTMIN+n``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number < signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"


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
        "_timeout_call", "_kill_call", "_kill_waiters", "request", "ended_time", "adopted",
        "spawn_ticks", "uid", "gid", "isolate", "cgroup", "_usage", "_done_observers",
        "_stuck_call", "limits", "oom_killed", "queued_at", "queue", "priority", "role",
        "launch_spec", "_start_observers", "after", "name", "labels", "__weakref__",
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
        log_dir: str | None,
        started: float,
        timeout: float | None,
        timeout_grace: float,
        signal_group: Callable[[Job, int], None],
        on_ended: Callable[[Job, bool], None],
    ) -> None:
        """``on_ended(job, again)``: once when the job ends (``again`` False), and once
        more (True) if its cgroup was still busy then, when its final usage is known."""
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
        self._packed: Encoded | None = None
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
        #: The client's retry key and the digest of what it asked (``start``'s request_id).
        self.request: tuple[str, bytes] | None = None
        self.ended_time: float | None = None
        #: Started by an earlier daemon and taken over at start-up: its exit status is
        #: not ours to collect.
        self.adopted = False
        #: Clock ticks after boot just before and after the spawn: they bound the start
        #: time /proc gives the process, which tells it from a later one with its pid.
        self.spawn_ticks: tuple[int, int] | None = None
        self.uid: int | None = None
        self.gid: int | None = None
        #: The namespaces it runs in (``jobworker.jobs.namespaces``); None: the host's.
        self.isolate: list[str] | None = None
        # The job's own cgroup (``attach_cgroup``), until it is empty and released; then
        # only the usage it reported last is kept.
        self.cgroup: JobCgroup | None = None
        self._usage: dict[str, Any] | None = None
        self._done_observers: list[Deferred[JobRecord]] = []
        self._stuck_call: DelayedCall | None = None
        # Set by the manager before spawning (record fields).
        self.limits: dict[str, Any] | None = None
        self.oom_killed = False
        # Scheduling (``jobworker.jobs.scheduler``): record fields, the caller's role (its
        # quota), and what a queued job's launch needs (env, credentials) until it starts.
        self.queued_at: str | None = None
        self.queue = DEFAULT_QUEUE
        self.priority = 0
        self.role: str | None = None
        self.launch_spec: bytes | None = None
        self._start_observers: list[Deferred[None]] = []
        self.after: list[str] | None = None
        self.name: str | None = None
        self.labels: dict[str, str] | None = None

    # -- what clients see --------------------------------------------------------------

    @property
    def started_at(self) -> str | None:
        if self.state == QUEUED or self.state == CANCELLED:
            return None  # it has not started (or never will)
        # Formatted once: every status, list and start reply carries it.
        if self._started_at is None or self._started_at[0] != self.started:
            self._started_at = (self.started, iso8601(self.started))
        return self._started_at[1]

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def usage(self) -> dict[str, Any] | None:
        """What the job's cgroup counted (None without one): live while it runs, final
        once its cgroup was emptied and released."""
        if self.cgroup is not None:
            return self.cgroup.usage()
        return self._usage

    @property
    def done(self) -> bool:
        """Ended, and no process of the job is left (its cgroup, if any, is released)."""
        return self.ended_at is not None and self.cgroup is None

    def record(self) -> JobRecord:
        """The job as clients (and a future store) see it."""
        return JobRecord.of(self)

    def wire(self) -> dict[str, Any]:
        """Exactly ``record().to_wire()``, without building the record first."""
        return wire_map(self)

    def packed(self) -> Encoded:
        """``wire()`` encoded as msgpack.  An ended job's record never changes again, so it
        is encoded once: a ``status`` or ``list`` of finished jobs, the common case, sends
        these bytes as they are."""
        packed = self._packed
        if packed is None:
            packed = Encoded(encode(wire_map(self)))
            if self.done:  # its usage is final too
                self._packed = packed
        return packed

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

    def when_started(self) -> Deferred[None]:
        """A new Deferred for each caller, fired once the job has left the queue: its
        process was spawned (its logs exist), or it ended without one."""
        if self.state != QUEUED:
            return succeed(None)
        d: Deferred[None] = Deferred(self._forget_start)
        self._start_observers.append(d)
        return d

    def _forget_start(self, d: Deferred[None]) -> None:
        if d in self._start_observers:
            self._start_observers.remove(d)

    def fire_started(self) -> None:
        """The job left the queue (the manager launched it, or it ended)."""
        observers, self._start_observers = self._start_observers, []
        for d in observers:
            d.callback(None)

    def when_done(self) -> Deferred[JobRecord]:
        """Like ``when_ended``, but fires only once every process of the job has gone
        (its cgroup empty, its final usage read); the same as ``when_ended`` without a
        cgroup."""
        if self.done:
            return succeed(self.record())
        d: Deferred[JobRecord] = Deferred(self._forget_done)
        self._done_observers.append(d)
        return d

    def _forget_done(self, d: Deferred[JobRecord]) -> None:
        if d in self._done_observers:
            self._done_observers.remove(d)

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

    def cancel(self, reason: str) -> None:
        """End a queued job that never started (``cancelled``, ``error`` says why)."""
        if self.state != QUEUED:
            return
        self.state = CANCELLED
        self.error = reason
        self.launch_spec = None
        self.log.info("{event} job={job_id} owner={owner}: {reason}", event="job.cancelled",
                      job_id=self.id, owner=self.owner, reason=reason)
        self._finish()

    def attach_cgroup(self, cgroup: JobCgroup) -> None:
        """The job's own cgroup, which its process will start in: stop then ends every
        process in it, and the job is done only once it is empty."""
        self.cgroup = cgroup

    def watch_memory(self) -> None:
        """The job has a memory limit: once the kernel kills one of its processes for want
        of memory, the daemon ends the rest (``oom_killed`` in the record)."""
        if self.cgroup is not None:
            self.cgroup.watch_oom(self._out_of_memory)

    def _out_of_memory(self) -> None:
        self.oom_killed = True
        self._packed = None
        self.log.info("{event} job={job_id} pid={pid} limit={limit}", event="job.oom_killed",
                      job_id=self.id, pid=self.pid,
                      limit=(self.limits or {}).get("memory"))
        self._cancel_timeout()
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill()

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

    def adopt(self, pid: int) -> None:
        """Taken over from an earlier daemon, running as ``pid``: its time limit still
        counts from its start."""
        self.adopted = True
        self.pid = self.protocol.pid = pid
        if self.timeout is not None:
            left = max(0.0, self.started + self.timeout - self._reactor.seconds())
            self._timeout_call = self._reactor.callLater(left, self._time_is_up)

    def stop(self, grace: float) -> Deferred[JobRecord]:
        """TERM the process group (and every process in the job's cgroup) now and KILL
        them after ``grace`` seconds; fires with the final record once the job has ended
        and, with a cgroup, no process of it is left.  Later stops share the first
        escalation (a shorter grace brings its KILL forward)."""
        if self.done:
            return succeed(self.record())
        if self.state == QUEUED:
            self.cancel("stopped before it started")
            return succeed(self.record())
        ended = self.when_done()
        if self._stopping:
            if self._kill_call is not None and self._kill_call.active():
                self._kill_call.reset(min(grace, self._kill_call.getTime()
                                          - self._reactor.seconds()))
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
        if self._kill_call is not None and self._kill_call.active():
            # Leftovers of an ended job already being ended: bring the KILL forward.
            self._kill_call.reset(min(grace, self._kill_call.getTime()
                                      - self._reactor.seconds()))
        else:
            self._kill_call = self._reactor.callLater(grace, self._kill)
        self._signal(signal.SIGTERM)
        return ended

    def settle(self) -> Deferred[None]:
        """Fires once no KILL sweep is pending; a pending sweep of a group with no member
        left is simply cancelled (used at shutdown so no timer outlives the manager)."""
        if self.cgroup is not None:
            return self.when_done().addCallback(lambda _: None)
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
        self._fire_kill_waiters()
        if self.cgroup is not None and self._stuck_call is None:
            self._stuck_call = self._reactor.callLater(STUCK_AFTER, self._stuck)

    def _stuck(self) -> None:
        """KILLed STUCK_AFTER ago and still not empty (a task in an uninterruptible sleep,
        on a dead NFS server say): answer the stop now rather than never; the cgroup is
        still watched, KILLed again and released once it empties."""
        self._stuck_call = None
        cgroup = self.cgroup
        if cgroup is None:
            return
        self.log.error("{event} job={job_id} pids={pids}", event="job.cgroup_stuck",
                       job_id=self.id, pids=cgroup.pids())
        if self.ended:
            self._fire_done()

    def _fire_kill_waiters(self) -> None:
        waiters, self._kill_waiters = self._kill_waiters, []
        for d in waiters:
            d.callback(None)

    def _signal(self, signum: int) -> None:
        cgroup = self.cgroup
        if cgroup is not None:
            # Every process in the cgroup, whatever its session or parent: TERM to each,
            # KILL by freezing first (``JobCgroup.kill``).  The group below as well: the
            # same processes, unless the job has no cgroup.
            if signum == signal.SIGKILL:
                cgroup.kill()
            else:
                cgroup.signal_all(signum)
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
            if self.adopted:
                # Stopped by us, it is ``stopped`` all the same; its status is not ours.
                self.state = STOPPED if self._stopping else LOST
                self.error = ("adopted after a daemon restart: its exit status went to its"
                              " new parent")
            else:
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
        cgroup = self.cgroup
        if (cgroup is not None and not self.oom_killed and (self.limits or {}).get("memory")
                and cgroup.oom_kills()):
            # Most often the leader itself was the victim: say so in the ended record.
            self.oom_killed = True
            self.log.info("{event} job={job_id} pid={pid} limit={limit}",
                          event="job.oom_killed", job_id=self.id, pid=self.pid,
                          limit=(self.limits or {}).get("memory"))
        self.ended_time = self._reactor.seconds()
        self.ended_at = iso8601(self.ended_time)
        pids: list[int] = []
        if cgroup is not None:
            pids = cgroup.pids()
            if pids:
                cgroup.refresh_usage()  # the ended record says what it used so far
            else:
                # The usual case, nothing left behind: the cgroup goes back now and the
                # ended record has the final usage (one record, one write).
                self._let_go(cgroup)
        self._on_ended(self, False)
        if self._start_observers:
            self.fire_started()
        observers, self._observers = self._observers, []
        if observers:  # most jobs end unwatched: no record to build then
            record = self.record()
            for d in observers:
                d.callback(record)
        if self.cgroup is None:
            self._fire_done()
        else:
            self._end_rest(self.cgroup, pids)

    def _end_rest(self, cgroup: JobCgroup, pids: list[int]) -> None:
        """The leader has ended, leaving ``pids`` in its cgroup: a job is its whole
        cgroup, so they are ended too (TERM now, KILL after the grace, as systemd's
        KillMode=control-group does when a service's main process exits); once the cgroup
        is empty, the job is done."""
        if self.oom_killed:
            self._kill()  # out of memory: the rest goes at once, no grace
        elif not self._stopping:
            left = cgroup.signal_all(signal.SIGTERM, pids)
            if left:
                self.log.info("{event} job={job_id} processes={count} grace={grace}",
                              event="job.leftovers", job_id=self.id, count=left,
                              grace=self._timeout_grace)
                self._kill_call = self._reactor.callLater(self._timeout_grace, self._kill)
        cgroup.when_empty(pids).addCallback(self._cgroup_empty, cgroup).addErrback(
            lambda f: self.log.failure("{event} job={job_id}", f, event="job.cgroup_bug",
                                       job_id=self.id))

    def _cgroup_empty(self, _: None, cgroup: JobCgroup) -> None:
        """The last of what the leader left behind has gone: the job is done."""
        self._let_go(cgroup)
        self._on_ended(self, True)  # the final usage: the store records the record again
        self._fire_done()

    def _let_go(self, cgroup: JobCgroup) -> None:
        """No process of the job is left: no more KILL; the cgroup goes back to the pool
        with its final usage read."""
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        if self._stuck_call is not None and self._stuck_call.active():
            self._stuck_call.cancel()
        self._stuck_call = None
        self._fire_kill_waiters()
        self._usage = cgroup.release()
        self.cgroup = None
        self._packed = None

    def _fire_done(self) -> None:
        observers, self._done_observers = self._done_observers, []
        if observers:
            record = self.record()
            for d in observers:
                d.callback(record)

    def _cancel_timeout(self) -> None:
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        self._timeout_call = None

    def __repr__(self) -> str:
        return f"<Job {self.id} pid={self.pid} state={self.state}>"


def _as_format(text: str) -> str:
    """Already-rendered text as a twisted.logger format with no fields in it.

    For the two events every job logs (``job.started``, ``job.ended``): twistd's text
    observer renders a format through ``string.Formatter`` one field at a time, ~8 us per
    event for these; text rendered once here by an f-string costs it a scan for braces.
    The event keeps its keys (event, job_id, owner, pid, ...) for observers and tests; the
    line reads exactly as the keyword-field format rendered it.
    """
    return text.replace("{", "{{").replace("}", "}}")
