"""One job's cgroup as its Job uses it, on the reactor: signal every process in it, KILL them
all (v1: freeze, SIGKILL each, thaw; v2: ``cgroup.kill``), notice when it is empty, and
read what the job used; policy (when to do which) stays in the Job."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from jobworker.jobs.cgroups import CgroupFiles, Kill

#: Polls of an emptying cgroup start this often and back off to MAX_POLL: most jobs are
#: gone within a few ms of their KILL, a stuck one should cost next to nothing.
FIRST_POLL = 0.002
MAX_POLL = 0.25
#: How long a freeze may stay FREEZING (a task in an uninterruptible sleep) before the
#: KILL goes out anyway; the poll then repeats the KILL until the cgroup is empty.
FREEZE_WAIT = 0.5
#: While a KILL is wanted and processes remain, it is sent again this often.
KILL_AGAIN = 0.5
#: A running job's usage is read from the kernel at most this often (status, list).
USAGE_TTL = 1.0
#: A job with a memory limit is checked for OOM kills this long after its start; if it
#: still runs, the kernel's OOM notification (v1: an eventfd; v2: inotify on
#: memory.events) is watched from then on, or where there is none the check repeats this
#: often.  Jobs that end sooner cost no registration.
OOM_POLL = 0.25
#: After an OOM notification (which comes just before the kill): when to look for the kill.
OOM_SETTLE = (0.0, 0.002, 0.01, 0.05, 0.25)

ZERO_USAGE: dict[str, Any] = {"cpu_seconds": 0.0, "memory_peak": 0, "io_read_bytes": 0,
                              "io_write_bytes": 0}


class JobCgroup:
    """A job's cgroup from spawn to removal; ``release`` hands it back for removal."""

    log = Logger()

    def __init__(self, reactor: Any, files: CgroupFiles, *, atomic_kill: bool,
                 on_release: Callable[[CgroupFiles], None],
                 kill: Kill = os.kill) -> None:
        self._reactor = reactor
        self._files = files
        self._atomic_kill = atomic_kill
        self._on_release = on_release
        self._kill = kill
        self.name = files.name
        # Fresh cgroups have used nothing: the start reply needs no read of the kernel.
        self._usage = (reactor.seconds(), dict(ZERO_USAGE))
        self._killing = False  # a KILL was asked for: repeat it while processes remain
        self._last_kill = 0.0
        self._freeze_call: DelayedCall | None = None
        self._poll_call: DelayedCall | None = None
        self._empty_waiters: list[Deferred[None]] = []
        self._released = False
        self._oom_call: DelayedCall | None = None
        self._on_oom: Callable[[], None] | None = None
        self._oom_reader: _EventReader | None = None

    # -- limits ----------------------------------------------------------------------------

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        """Before the spawn: OSError if the kernel refuses one (or lacks its controller)."""
        self._files.set_limits(memory, cpu, pids)

    def set_io(self, devices: Sequence[str], read: int | None, write: int | None) -> None:
        """Before the spawn: bytes per second on each disk; OSError as for set_limits."""
        self._files.set_io(devices, read, write)

    def oom_kills(self) -> int:
        try:
            return self._files.oom_kills()
        except (OSError, ValueError):
            return 0

    def watch_oom(self, on_oom: Callable[[], None]) -> None:
        """Call ``on_oom`` once, when the kernel first kills a process here for want of
        memory: checked OOM_POLL seconds after the start, then on the kernel's notification
        (v1's eventfd, v2's memory.events), else every OOM_POLL seconds, until the cgroup is
        released."""
        self._on_oom = on_oom
        self._oom_call = self._reactor.callLater(OOM_POLL, self._poll_oom)

    def _poll_oom(self) -> None:
        self._oom_call = None
        if self._released or self._found_oom("poll"):
            return
        if self._oom_reader is None:
            fd = self._oom_notifier()
            if fd is not None:
                self._oom_reader = _EventReader(fd, self._oom_event)
                self._reactor.addReader(self._oom_reader)
                return
        self._oom_call = self._reactor.callLater(OOM_POLL, self._poll_oom)

    def _oom_notifier(self) -> int | None:
        try:
            return self._files.oom_notifier()
        except OSError:
            return None

    def _oom_event(self) -> None:
        """The notification: the kill follows it; look for it at once and a few times
        after (OOM_SETTLE), then wait for the next notification."""
        if self._oom_call is not None and self._oom_call.active():
            self._oom_call.cancel()
        self._settle(0)

    def _settle(self, step: int) -> None:
        self._oom_call = None
        if self._released or self._found_oom("event"):
            return
        if step + 1 < len(OOM_SETTLE):
            self._oom_call = self._reactor.callLater(OOM_SETTLE[step + 1], self._settle,
                                                     step + 1)

    def _found_oom(self, via: str) -> bool:
        if not self.oom_kills():
            return False
        on_oom, self._on_oom = self._on_oom, None
        self._stop_oom_reader()
        self.log.info("{event} cgroup={name} via={via}", event="cgroup.oom_seen",
                      name=self.name, via=via)
        if on_oom is not None:
            on_oom()
        return True

    def _stop_oom_reader(self) -> None:
        reader, self._oom_reader = self._oom_reader, None
        if reader is not None:
            self._reactor.removeReader(reader)
            os.close(reader.fd)

    # -- spawning (reactor thread, around posix_spawn) -------------------------------------

    def enter(self) -> None:
        self._files.enter()

    def leave(self) -> None:
        self._files.leave()

    # -- signals -----------------------------------------------------------------------------

    def pids(self) -> list[int]:
        try:
            return self._files.pids()
        except OSError:
            return []

    def signal_all(self, signum: int, pids: list[int] | None = None) -> int:
        """Send ``signum`` to every process in the cgroup now (``pids``, if just read);
        how many got it.  (Not race-free against forks: the TERM is a request, the KILL
        below is the guarantee.)"""
        sent = 0
        for pid in self.pids() if pids is None else pids:
            try:
                self._kill(pid, signum)
                sent += 1
            except ProcessLookupError:
                pass
        return sent

    def kill(self) -> None:
        """KILL every process in the cgroup, forks included: v2 writes ``cgroup.kill``; v1
        freezes the cgroup (no task runs, so none can fork), SIGKILLs each, then thaws.
        Repeated by ``when_empty``'s poll for as long as processes remain."""
        self._killing = True
        self._last_kill = self._reactor.seconds()
        if self._freeze_call is not None:
            return  # a freeze is under way; it ends in a KILL
        try:
            if self._atomic_kill or not self._files.freeze():
                self._files.kill_all(self._kill)
                return
        except OSError:
            self.log.failure("{event} cgroup={name}", event="cgroup.kill_failed",
                             name=self.name)
            return
        self._await_frozen(self._reactor.seconds() + FREEZE_WAIT)

    def _await_frozen(self, deadline: float) -> None:
        self._freeze_call = None
        try:
            if not self._files.frozen() and self._reactor.seconds() < deadline:
                self._freeze_call = self._reactor.callLater(0.001, self._await_frozen,
                                                            deadline)
                return
            self._files.kill_all(self._kill)
        except OSError:
            self.log.failure("{event} cgroup={name}", event="cgroup.kill_failed",
                             name=self.name)
        finally:
            if self._freeze_call is None:
                self._thaw()

    def _thaw(self) -> None:
        try:
            self._files.thaw()
        except OSError:
            self.log.failure("{event} cgroup={name}", event="cgroup.thaw_failed",
                             name=self.name)

    # -- the end -----------------------------------------------------------------------------

    def when_empty(self, pids: list[int] | None = None) -> Deferred[None]:
        """Fires once no process is left in the cgroup (``pids``: as just read); polls on
        the reactor's clock."""
        if self._poll_call is None and not (self.pids() if pids is None else pids):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._empty_waiters.append(d)
        if self._poll_call is None:
            self._poll_call = self._reactor.callLater(FIRST_POLL, self._poll, FIRST_POLL)
        return d

    def _poll(self, interval: float) -> None:
        self._poll_call = None
        if self.pids():
            if (self._killing and self._freeze_call is None
                    and self._reactor.seconds() - self._last_kill >= KILL_AGAIN):
                self.kill()
            interval = min(interval * 2, MAX_POLL)
            self._poll_call = self._reactor.callLater(interval, self._poll, interval)
            return
        waiters, self._empty_waiters = self._empty_waiters, []
        for d in waiters:
            d.callback(None)

    def usage(self) -> dict[str, Any]:
        """What the job has used so far (read at most every USAGE_TTL seconds)."""
        if self._reactor.seconds() - self._usage[0] >= USAGE_TTL:
            self.refresh_usage()
        return self._usage[1]

    def refresh_usage(self) -> None:
        """Read what the job has used now, whatever the last read's age (its leader has
        ended: the ended record says what the job used up to then)."""
        if not self._released:
            self._usage = (self._reactor.seconds(), self._read_usage())

    def _read_usage(self) -> dict[str, Any]:
        try:
            return self._files.usage()
        except OSError:
            return self._usage[1]

    def release(self) -> dict[str, Any]:
        """The job is over and its cgroup empty: read the final usage (a few reads of
        descriptors held open), then hand the cgroup back to be recycled or removed."""
        if self._released:
            return self._usage[1]
        for call in (self._poll_call, self._freeze_call, self._oom_call):
            if call is not None and call.active():
                call.cancel()
        self._poll_call = self._freeze_call = self._oom_call = None
        self._stop_oom_reader()
        self.refresh_usage()
        self._released = True
        self._on_release(self._files)
        return self._usage[1]

    def __repr__(self) -> str:
        return f"<JobCgroup {self.name}>"


@implementer(IReadDescriptor)
class _EventReader:
    """An eventfd or inotify descriptor on the reactor: each time it is readable, drain it
    and call ``on_event``."""

    def __init__(self, fd: int, on_event: Callable[[], None]) -> None:
        self.fd = fd
        self._on_event = on_event

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        try:
            os.read(self.fd, 4096)  # an eventfd's counter, or inotify's events
        except BlockingIOError:
            return
        self._on_event()

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "cgroup-oom"


__all__ = ["FIRST_POLL", "FREEZE_WAIT", "KILL_AGAIN", "MAX_POLL", "OOM_POLL", "OOM_SETTLE",
           "USAGE_TTL",
           "ZERO_USAGE",
           "JobCgroup"]
