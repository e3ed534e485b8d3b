"""A job's process as Twisted sees it: the transport started by our posix_spawn and reaped
through its pidfd, and the thin ProcessProtocol that hands the end of it to its Job."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker._twisted import Process, init_process_base
from jobworker.jobs.posix_spawn import posix_spawn_job
from jobworker.jobs.reaping import watch_exit

log = Logger()


class JobProcessProtocol(ProcessProtocol):
    """Forwards the end of the process to its Job; all policy lives in the Job.

    The child has no pipes, so there is no output to receive here.
    """

    def __init__(self, on_ended: Callable[[Failure], None]) -> None:
        self._on_ended = on_ended
        # Kept because the transport forgets its pid once the child is reaped, which can
        # happen before spawning even returns.
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        # An ended job stays in the daemon's history for good: let the finished process
        # object (Twisted's Process, ~1 KiB) go rather than keep it alive with the job.
        self.transport = None
        self._on_ended(reason)


def spawn(
    reactor: Any,
    protocol: ProcessProtocol,
    executable: str,
    args: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    stdout_fd: int,
    stderr_fd: int,
) -> IProcessTransport:
    """Start ``executable`` (absolute) as the leader of a new session and process group, with
    stdin on /dev/null, stdout/stderr on the given fds and no other descriptor.

    Raises OSError if the kernel refuses (exec format error, permission...).  The caller
    still owns ``stdout_fd``/``stderr_fd`` and should close them once this returns.
    """
    child_fds = {0: _stdin_fd(), 1: stdout_fd, 2: stderr_fd}
    if isinstance(reactor, PosixReactorBase):
        process = JobProcess(reactor, executable, list(args), dict(env), cwd, protocol, child_fds)
        return cast(IProcessTransport, process)
    # Fakes (jobworker.testing) only need to see the call.
    return reactor.spawnProcess(  # type: ignore[no-any-return]
        protocol, executable, list(args), dict(env), path=cwd, childFDs=child_fds
    )


_devnull_fd = -1


def _stdin_fd() -> int:
    """/dev/null, read-only and close-on-exec, opened once for the daemon's life: every
    job's stdin is a dup2 of it (an open and a close fewer per spawn)."""
    global _devnull_fd
    if _devnull_fd < 0:
        _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull_fd


@implementer(IProcessTransport)
class JobProcess(Process):
    """Twisted's Process, started by ``posix_spawn_job`` in a session of its own and
    reaped through a pidfd (``jobworker.jobs.reaping``)."""

    def __init__(
        self,
        reactor: PosixReactorBase,
        executable: str,
        args: list[str],
        environment: dict[str, str],
        path: str | None,
        proto: ProcessProtocol,
        childFDs: dict[int, int],
    ) -> None:
        # Not Process.__init__: it is general (pipes, uid/gid, fork or spawn) and hands
        # the pid to Twisted's reap-everything table (a waitpid).  A job has only
        # descriptors the daemon already opened: spawn, connect the protocol, watch the
        # pidfd.  What Process's other methods use is set here.
        self._reactor = reactor
        init_process_base(self, proto)
        self.pipes: dict[int, Any] = {}
        self.pid = posix_spawn_job(  # type: ignore[assignment]
            executable, args, environment, path, childFDs
        )
        self.status = -1
        try:
            proto.makeConnection(self)
        except BaseException:
            log.failure("{event} pid={pid}", event="process.connect_failed", pid=self.pid)
        watch_exit(reactor, cast(int, self.pid), self)

    def exit_status_lost(self) -> None:
        """End without a status: ProcessTerminated with neither exit code nor signal."""
        self.pid = None
        self.lostProcess += 1
        proto = cast(ProcessProtocol | None, self.proto)
        self.proto = None
        if proto is not None:
            proto.processEnded(Failure(ProcessTerminated(None, None, None)))
