"""Every Twisted name jobworker uses that Twisted does not promise to keep.

Each is wrapped here once, with why we use it and what to do when a Twisted release
changes it; nothing else in jobworker touches a private Twisted name.  ``missing()`` lists
what this Twisted lacks, and ``tests/test_twisted_internals.py`` fails on any of them, so an
upgrade that drops one is noticed at once instead of silently taking a slower path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import abstract
from twisted.internet import process as _process
from twisted.protocols import tls as _tls

# -- processes (jobworker.jobs.process, jobworker.jobs.posix_spawn) ---------------------------

#: Twisted's posix process transport.  ``JobProcess`` subclasses it for its
#: ``IProcessTransport`` methods (signalProcess, processEnded(status), the exit-status
#: mapping) but starts the child itself, so it relies on what ``Process.__init__`` would
#: have set: ``pipes``, ``status``, ``lostProcess`` and ``proto``.  If they change, copy
#: the few methods JobProcess needs into it instead of subclassing.
Process = _process.Process


def init_process_base(process: Any, proto: Any) -> None:
    """``_BaseProcess.__init__``: connects ``proto`` without spawning anything.

    Why: ``Process.__init__`` is general (pipes, uid/gid, fork or spawn) and hands the pid
    to the reap-everything table; a job needs none of it.  If it goes, set what it sets
    (``proto``, ``lostProcess``, ``status``) in ``JobProcess.__init__``.
    """
    _process._BaseProcess.__init__(process, proto)


def reap_with_twisted(pid: int, process: Any) -> None:
    """Hand ``pid`` to Twisted's SIGCHLD reaper (``registerReapProcessHandler``).

    Why: the fallback where a child cannot be watched on a pidfd.  If it goes, reap such
    children with a timer that calls ``waitpid(pid, WNOHANG)``.
    """
    _process.registerReapProcessHandler(pid, process)


def twisted_reaps(pid: int | None = None) -> bool:
    """Whether Twisted's reaper watches ``pid`` (any child, for None): its
    ``reapProcessHandlers`` table.

    Why: SIGCHLD may be quieted only while Twisted's reaper has no child to watch, and a
    pid must not be handed to it twice.  If it goes, keep our own set of handed-over pids.
    """
    handlers = _process.reapProcessHandlers
    return bool(handlers) if pid is None else pid in handlers


def open_fds() -> list[int]:
    """Every descriptor open in this process (``_listOpenFDs``).

    Why: ``os.posix_spawn`` (3.11) cannot close every other descriptor in the child, so its
    fallback path lists them.  If it goes, list ``/proc/self/fd``.
    """
    return list(_process._listOpenFDs())


def plan_file_actions(fd_state: Sequence[tuple[int, bool]], fdmap: dict[int, int],
                      do_close: int, do_dup2: int) -> list[tuple[int, ...]]:
    """Twisted's planner of dup2/close actions (``_getFileActions``), which orders the dup2s
    so that no target clobbers a later source.

    Why: the same plan is needed for posix_spawn's file actions.  If it goes, copy the
    planner (about 60 lines) into ``jobworker.jobs.posix_spawn``.
    """
    return list(_process._getFileActions(list(fd_state), fdmap, doClose=do_close,
                                         doDup2=do_dup2))


# -- socket writes (jobworker.rpc.writethrough) ------------------------------------------------

#: What a transport must have for us to tell that nothing is queued in it: Twisted's
#: ``FileDescriptor`` write buffers (``dataBuffer`` from ``offset`` on, then
#: ``_tempDataBuffer`` of ``_tempDataLen`` bytes), its ``socket``, and its state flags.
WRITE_BUFFER_ATTRIBUTES = ("socket", "dataBuffer", "offset", "_tempDataLen", "connected",
                           "disconnecting")


def has_write_buffer(transport: Any) -> bool:
    """Whether ``transport`` is a socket transport whose write buffers we can read."""
    return all(hasattr(transport, name) for name in WRITE_BUFFER_ATTRIBUTES)


def nothing_queued(transport: Any) -> bool:
    """Whether a connected socket transport has no byte queued for writing.

    Why: a write made when nothing is queued can go to the socket at once (see
    ``jobworker.rpc.writethrough``).  If these attributes change, ``write_through`` must
    learn the new ones; until then it leaves transports alone (``has_write_buffer``).
    """
    return (
        not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
    )


# -- TLS (jobworker.rpc.tls) ---------------------------------------------------------------------


def fail_verification(tls_protocol: Any, reason: Any) -> bool:
    """Abort a handshake with ``reason`` (``TLSMemoryBIOProtocol.failVerification``, not
    part of any interface); returns whether it could.

    Why: the client's own certificate checks (EKU, name) then reach the caller as their
    reason, not as OpenSSL's generic "certificate verify failed".  If it goes, only the
    message gets worse: the handshake is still refused by the verify callback.
    """
    fail = getattr(tls_protocol, "failVerification", None)
    if fail is None:
        return False
    fail(reason)
    return True


def missing() -> list[str]:
    """The names above that this Twisted lacks (empty on a Twisted that has them all)."""
    needed: list[tuple[str, object, str]] = [
        ("twisted.internet.process", _process, "_BaseProcess"),
        ("twisted.internet.process", _process, "registerReapProcessHandler"),
        ("twisted.internet.process", _process, "reapProcessHandlers"),
        ("twisted.internet.process", _process, "_listOpenFDs"),
        ("twisted.internet.process", _process, "_getFileActions"),
        ("twisted.internet.process.Process", Process, "processEnded"),
        ("twisted.internet.process.Process", Process, "signalProcess"),
        ("twisted.protocols.tls.TLSMemoryBIOProtocol", _tls.TLSMemoryBIOProtocol,
         "failVerification"),
    ]
    gone = [f"{where}.{name}" for where, owner, name in needed if not hasattr(owner, name)]
    descriptor = abstract.FileDescriptor(reactor=object())  # type: ignore[arg-type]
    for name in WRITE_BUFFER_ATTRIBUTES:
        if name != "socket" and not hasattr(descriptor, name):
            gone.append(f"twisted.internet.abstract.FileDescriptor().{name}")
    return gone
