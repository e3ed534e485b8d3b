"""Reaping job processes: each child watched on a pidfd of its own, so one exit costs
O(1) instead of Twisted's waitpid of every child on each SIGCHLD; Twisted's reaper is the
fallback, and SIGCHLD is quieted while nothing needs it."""

from __future__ import annotations

import os
import signal
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker._twisted import reap_with_twisted, twisted_reaps

log = Logger()


class Reapable(Protocol):
    """A process transport as the reaper sees it (``jobworker.jobs.process.JobProcess``)."""

    pid: Any

    def processEnded(self, status: int) -> None:
        """The child was reaped with this wait status."""

    def exit_status_lost(self) -> None:
        """The child was reaped elsewhere: its status is gone."""


def watch_exit(reactor: Any, pid: int, process: Reapable) -> None:
    """Watch child ``pid`` on a pidfd of its own; where there is none (old kernel, a
    reactor without file descriptors), Twisted's SIGCHLD reaper takes it."""
    if IReactorFDSet.providedBy(reactor):
        try:
            pidfd = os.pidfd_open(pid)  # always close-on-exec; works on a zombie too
        except (AttributeError, OSError):
            pass
        else:
            reactor.addReader(PidfdWatcher(reactor, process, pid, pidfd))
            return
    child_signals.restore()
    reap_with_twisted(pid, process)


def hand_back(pid: int, process: Reapable) -> None:
    """A pidfd can no longer be watched: hand the child to Twisted's reaper, once."""
    if process.pid == pid and not twisted_reaps(pid):
        child_signals.restore()
        reap_with_twisted(pid, process)


@implementer(IReadDescriptor)
class PidfdWatcher:
    """Readable when the child has exited; then reaps exactly that child."""

    def __init__(self, reactor: Any, process: Reapable, pid: int, pidfd: int) -> None:
        self._reactor = reactor
        self._process = process
        self._pid = pid
        self._fd = pidfd

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return f"pidfd({self._pid})"

    def doRead(self) -> None:
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (a stray os.wait()); the status is gone.
            log.error("{event} pid={pid}: reaped elsewhere", event="process.lost", pid=self._pid)
            self._stop()
            self._process.exit_status_lost()
            return
        if pid == 0:
            # Readable but not waitable (e.g. traced): let Twisted's reaper poll it rather
            # than spin on a level-triggered descriptor.
            self._stop()
            hand_back(self._pid, self._process)
            return
        self._stop()
        self._process.processEnded(status)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped us (shutdown); don't lose the child.
        if self._fd >= 0:
            self._close()
            hand_back(self._pid, self._process)

    def _stop(self) -> None:
        self._reactor.removeReader(self)
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class ChildSignals:
    """Twisted's SIGCHLD handler, taken off while every job is reaped through its pidfd.

    The reactor installs a SIGCHLD handler so that its reaper can waitpid each child it
    knows when one exits.  Jobs watched on pidfds never need it, yet each exit still costs
    a signal delivery, a write and a read on the reactor's wake-up pipe and a reactor pass
    that reaps nothing: about 6% of the daemon's CPU per ``start /bin/true`` (paired A/B
    windows, daemon CPU per job).  ``quiet`` sets SIGCHLD to SIG_DFL (children still wait
    as zombies to be reaped, unlike with SIG_IGN); ``restore`` puts Twisted's handler back,
    and is called before any job is handed to Twisted's reaper.  Only the daemon quiets it
    (``QuietChildSignals``): nothing else in its process starts children through Twisted.
    Main thread only, as ``signal.signal`` requires.
    """

    def __init__(self) -> None:
        self._saved: Any = None

    @property
    def quiet_now(self) -> bool:
        return self._saved is not None

    def quiet(self) -> bool:
        """Take the reactor's SIGCHLD handler off, unless Twisted's reaper has children to
        watch or there is no Python handler to take off; returns whether it is off."""
        if self._saved is not None:
            return True
        current = signal.getsignal(signal.SIGCHLD)
        if current in (signal.SIG_DFL, signal.SIG_IGN, None) or twisted_reaps():
            return False
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._saved = current
        return True

    def restore(self) -> None:
        """Put the saved handler back (restarting interrupted calls, as Twisted sets it)."""
        saved, self._saved = self._saved, None
        if saved is not None and signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL:
            signal.signal(signal.SIGCHLD, saved)
            signal.siginterrupt(signal.SIGCHLD, False)


child_signals = ChildSignals()


class QuietChildSignals(service.Service):
    """Quiets SIGCHLD once the reactor runs (it installs its handlers as it starts) and
    pidfds work here; puts it back on stop."""

    def __init__(self, reactor: Any, signals: ChildSignals = child_signals) -> None:
        self._reactor = reactor
        self._signals = signals

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._quiet)

    def _quiet(self) -> None:
        if self.running and _pidfds_work():
            self._signals.quiet()

    def stopService(self) -> Any:
        self._signals.restore()
        return super().stopService()


def _pidfds_work() -> bool:
    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True
