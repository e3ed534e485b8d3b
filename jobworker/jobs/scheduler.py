"""Which admitted job runs next: the daemon-wide and per-queue parallelism limits, the
quotas of each identity, and the fair order (higher priority first; within a priority,
round-robin between identities, first in first out within one).

Pure bookkeeping on the reactor thread: every decision is O(queues x identities), never
O(queued jobs), so 10,000 queued jobs cost a start or an end nothing more.  Starting a job
is the caller's business (``start``, given at construction).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from jobworker.wire.errors import BadRequest, Forbidden, Unavailable
from jobworker.wire.record import DEFAULT_QUEUE, EXITED, QUEUED


@dataclass(frozen=True)
class Quota:
    """What one identity may have: running and queued jobs at once (None: no limit), and
    the highest priority it may ask for."""

    max_running: int | None = None
    max_queued: int | None = None
    max_priority: int = 0


@dataclass(frozen=True)
class QueuePolicy:
    """The policy file's ``[queue.NAME]`` (``parallel``) and ``[quota.role.R]`` /
    ``[quota.identity.I]`` tables.  An identity's table replaces its role's as a whole."""

    queues: Mapping[str, int | None] = field(default_factory=dict)
    roles: Mapping[str, Quota] = field(default_factory=dict)
    identities: Mapping[str, Quota] = field(default_factory=dict)

    def quota(self, identity: str, role: str | None) -> Quota:
        found = self.identities.get(identity)
        if found is None and role is not None:
            found = self.roles.get(role)
        return found if found is not None else _NO_QUOTA

    def knows(self, queue: str) -> bool:
        return queue == DEFAULT_QUEUE or queue in self.queues

    def parallel(self, queue: str) -> int | None:
        return self.queues.get(queue)


_NO_QUOTA = Quota()


class _Queue:
    """One named queue: its running count, and its waiting jobs by priority, each priority
    a rotation of identities (the head is served next) with each identity's jobs in order."""

    __slots__ = ("name", "running", "queued", "levels", "priorities")

    def __init__(self, name: str) -> None:
        self.name = name
        self.running = 0
        self.queued = 0
        self.levels: dict[int, OrderedDict[str, deque[Any]]] = {}
        self.priorities: list[int] = []  # highest first

    def push(self, job: Any) -> None:
        level = self.levels.get(job.priority)
        if level is None:
            level = self.levels[job.priority] = OrderedDict()
            self.priorities = sorted(self.levels, reverse=True)
        waiting = level.get(job.owner)
        if waiting is None:
            waiting = level[job.owner] = deque()  # a newcomer joins the end of the turn
        waiting.append(job)
        self.queued += 1

    def pick(self, may_run: Callable[[str, str | None], bool]) -> Any | None:
        """The next job in fair order whose owner may run one more, taken off the queue."""
        for priority in self.priorities:
            level = self.levels[priority]
            for owner in list(level):
                waiting = level[owner]
                while waiting and waiting[0].state != QUEUED:
                    waiting.popleft()  # cancelled meanwhile: its count is gone already
                if not waiting:
                    del level[owner]
                    continue
                if not may_run(owner, getattr(waiting[0], "role", None)):
                    continue
                job = waiting.popleft()
                if waiting:
                    level.move_to_end(owner)  # served: to the back of the turn
                else:
                    del level[owner]
                self.queued -= 1
                if not level:
                    self._drop(priority)
                return job
            if not level:
                self._drop(priority)
        return None

    def heads(self, count: int) -> list[Any]:
        """About the next ``count`` jobs ``pick`` would take (each identity's first at
        each priority, in turn), without taking them."""
        found: list[Any] = []
        for priority in self.priorities:
            for waiting in self.levels[priority].values():
                for job in waiting:
                    if job.state == QUEUED:
                        found.append(job)
                        break
                if len(found) >= count:
                    return found
        return found

    def _drop(self, priority: int) -> None:
        if priority in self.levels and not self.levels[priority]:
            del self.levels[priority]
            self.priorities = sorted(self.levels, reverse=True)


class Scheduler:
    """Holds admitted jobs until a slot is free for them, then hands them to ``start``."""

    log = Logger()

    def __init__(self, start: Callable[[Any], None], max_running: int | None = None,
                 policy: Callable[[], QueuePolicy] = QueuePolicy) -> None:
        self._start = start
        self.max_running = max_running
        self._policy = policy
        self._queues: dict[str, _Queue] = {}
        # Queues with jobs waiting, in turn: served round-robin under the daemon's limit.
        self._turn: OrderedDict[str, _Queue] = OrderedDict()
        self._slots: dict[str, Any] = {}  # job id -> job, for every job holding a slot
        self._waiting: dict[str, Any] = {}  # job id -> job, for every queued job
        # Queued jobs held for their dependencies (``after``): job id -> (job, the ids of
        # those not yet exited 0); and each dependency's dependants.
        self._held: dict[str, tuple[Any, set[str]]] = {}
        self._dependants: dict[str, list[Any]] = {}
        self._running_by: dict[str, int] = {}
        self._queued_by: dict[str, int] = {}
        self._frozen = False

    # -- what callers see -----------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._slots)

    @property
    def queued(self) -> int:
        """Jobs waiting now, for a slot or for their dependencies (the operators' gauge)."""
        return len(self._waiting) + len(self._held)

    @property
    def busy(self) -> bool:
        """Whether a new job would likely queue (jobs wait, or every slot is taken)."""
        return bool(self._waiting) or (self.max_running is not None
                                       and len(self._slots) >= self.max_running)

    def counts(self) -> list[dict[str, Any]]:
        """Each queue known to the policy or holding jobs: name, running, queued and its
        parallel limit (None: unlimited), by name."""
        policy = self._policy()
        names = {DEFAULT_QUEUE, *policy.queues, *self._queues}
        held: dict[str, int] = {}
        for job, _ in self._held.values():
            held[job.queue] = held.get(job.queue, 0) + 1
        rows = []
        for name in sorted(names):
            q = self._queues.get(name)
            rows.append({"queue": name, "running": q.running if q else 0,
                         "queued": (q.queued if q else 0) + held.get(name, 0),
                         "parallel": policy.parallel(name)})
        return rows

    # -- admission ----------------------------------------------------------------------

    def check(self, owner: str, role: str | None, queue: str, priority: int) -> None:
        """Raise if a start into ``queue`` at ``priority`` is refused: an unknown queue,
        a priority above the owner's ``max_priority`` (``place`` checks ``max_queued``)."""
        policy = self._policy()
        if not policy.knows(queue):
            raise BadRequest(f"no such queue: {queue!r} (the policy's [queue.NAME] "
                             f"tables name them; {DEFAULT_QUEUE!r} always exists)")
        quota = policy.quota(owner, role)
        if priority > quota.max_priority:
            raise Forbidden(f"priority {priority} is above {owner!r}'s max_priority "
                            f"{quota.max_priority} (policy [quota])")

    def place(self, job: Any) -> bool:
        """A new job (state ``queued``): True if it takes a slot now (the caller runs it at
        once), else it waits in its queue and a later ``ended`` starts it.  It waits its
        turn behind the jobs queued before it, unless their owners are at their limits.
        Raises L{Unavailable} (and holds nothing) if it would pass its owner's
        ``max_queued``."""
        queue = self._queue(job.queue)
        self._enqueue(queue, job)
        if self.pump(job):
            return True
        limit = self._policy().quota(job.owner, getattr(job, "role", None)).max_queued
        if limit is not None and self._queued_by.get(job.owner, 0) > limit:
            # Refused after all: it is the newest of its owner's at its priority.
            queue.levels[job.priority][job.owner].pop()
            queue.queued -= 1
            del self._waiting[job.id]
            _count(self._queued_by, job.owner, -1)
            raise Unavailable(f"{job.owner!r} has {limit} jobs queued already, its "
                              "max_queued (policy [quota]): try again once some have "
                              "started")
        return False

    def hold(self, job: Any, after: list[Any]) -> None:
        """A queued job (new, or found at start-up) that may start only once every job
        of ``after`` (not ended yet) has exited 0; the caller cancels it if one of its
        dependencies has ended otherwise already."""
        self._queue(job.queue)
        self._held[job.id] = (job, {dep.id for dep in after})
        _count(self._queued_by, job.owner, 1)
        for dep in after:
            self._dependants.setdefault(dep.id, []).append(job)

    def requeue(self, job: Any) -> None:
        """A queued job found in the table at start-up, in its order (oldest first)."""
        self._enqueue(self._queue(job.queue), job)

    def adopt(self, job: Any) -> None:
        """A running job of an earlier daemon: it holds a slot (even past the limits)."""
        self._take(self._queue(job.queue), job)

    def ended(self, job: Any) -> None:
        """``job`` ended (called again for its final usage: only the first counts); frees
        its slot, or its place in the queue, and starts what can start now."""
        if self._slots.pop(job.id, None) is not None:
            self._queues[job.queue].running -= 1
            _count(self._running_by, job.owner, -1)
        elif self._waiting.pop(job.id, None) is not None:
            queue = self._queues[job.queue]
            queue.queued -= 1  # it stays in its deque until a pick passes it
            _count(self._queued_by, job.owner, -1)
        elif self._held.pop(job.id, None) is not None:
            _count(self._queued_by, job.owner, -1)
        else:
            return
        self._settle_dependants(job)
        self.pump()

    def _settle_dependants(self, dep: Any) -> None:
        """``dep`` ended: release the jobs that waited only for it, cancel those it
        failed (which ends theirs in turn)."""
        for job in self._dependants.pop(dep.id, []):
            entry = self._held.get(job.id)
            if entry is None:
                continue  # cancelled meanwhile
            if dep.state == EXITED and dep.exit_code == 0:
                entry[1].discard(dep.id)
                if not entry[1]:
                    del self._held[job.id]
                    _count(self._queued_by, job.owner, -1)
                    self._enqueue(self._queue(job.queue), job)
            else:
                job.cancel(dependency_failed(dep))

    def upcoming(self, count: int) -> list[Any]:
        """About the next ``count`` jobs to start, for work done ahead (their cgroups)."""
        found: list[Any] = []
        for queue in self._turn.values():
            found.extend(queue.heads(count - len(found)))
            if len(found) >= count:
                break
        return found

    def reloaded(self) -> None:
        """The policy changed (SIGHUP): a limit raised may let queued jobs start."""
        self.pump()

    def freeze(self) -> None:
        """Start nothing more (shutdown: queued jobs stay queued for the next daemon)."""
        self._frozen = True

    def pump(self, fresh: Any = None) -> bool:
        """Start queued jobs while slots are free; True if ``fresh`` (a job being admitted,
        not yet in the table) took one, which the caller starts itself."""
        taken = False
        while not self._frozen and self._waiting and (
                self.max_running is None or len(self._slots) < self.max_running):
            job = self._next()
            if job is None:
                break
            del self._waiting[job.id]
            _count(self._queued_by, job.owner, -1)
            self._take(self._queues[job.queue], job)
            if job is fresh:
                taken = True
            else:
                self._start(job)
        return taken

    # -- internals ----------------------------------------------------------------------

    def _next(self) -> Any | None:
        """The next job of the queues in turn that have room for one more."""
        policy = self._policy()
        for name in list(self._turn):
            queue = self._turn[name]
            if not queue.queued:
                del self._turn[name]
                continue
            parallel = policy.parallel(name)
            if parallel is not None and queue.running >= parallel:
                continue
            job = queue.pick(self._owner_may_run)
            if job is not None:
                self._turn.move_to_end(name)
                if not queue.queued:
                    del self._turn[name]
                return job
        return None

    def _owner_may_run(self, owner: str, role: str | None) -> bool:
        limit = self._policy().quota(owner, role).max_running
        return limit is None or self._running_by.get(owner, 0) < limit

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
        return queue

    def _take(self, queue: _Queue, job: Any) -> None:
        self._slots[job.id] = job
        queue.running += 1
        _count(self._running_by, job.owner, 1)

    def _enqueue(self, queue: _Queue, job: Any) -> None:
        self._waiting[job.id] = job
        queue.push(job)
        _count(self._queued_by, job.owner, 1)
        if queue.name not in self._turn:
            self._turn[queue.name] = queue


def dependency_failed(dep: Any) -> str:
    """Why a dependant of ``dep`` (ended, not with exit code 0) is cancelled."""
    how = f"{dep.state}" + (f" with exit code {dep.exit_code}"
                            if dep.exit_code is not None else "")
    return f"dependency {dep.id} {how}: it did not exit 0"


def _count(counts: dict[str, int], key: str, change: int) -> None:
    n = counts.get(key, 0) + change
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
