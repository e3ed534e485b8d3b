"""Starting job processes: program lookup, a posix_spawn path that keeps ~1,000 jobs cheap,
and the thin ProcessProtocol that hands the end of a process to its Job."""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import signal
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from twisted.application import service
from twisted.internet import process as _twisted_process
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import (
    IProcessTransport,
    IReactorFDSet,
    IReadDescriptor,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()


class SpawnError(Exception):
    """The job cannot be started; ``message`` says why in words a client can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


# -- locating things -------------------------------------------------------------------------


def check_directory(path: str) -> None:
    """Raise SpawnError unless ``path`` is an existing directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpawnError(f"no such directory: {path}") from None
    except OSError as e:
        raise SpawnError(f"cannot use directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SpawnError(f"not a directory: {path}")


def resolve_program(command: str, path_env: str, cwd: str | None = None) -> str:
    """The absolute executable for ``command``, the way a shell would find it.

    A command containing "/" is taken as a path (relative to the job's ``cwd``); any other is
    searched in ``path_env``.  Only absolute PATH entries are searched: a relative entry
    would depend on the directory, which is surprising for a remote caller.
    """
    if not command:
        raise SpawnError("no such program: ''")
    if "\0" in command:
        raise SpawnError("program name contains a NUL byte")
    base = cwd if cwd is not None else os.getcwd()
    if "/" in command:
        path = os.path.normpath(os.path.join(base, command))
        _check_executable(path, command)
        return path
    refused: SpawnError | None = None
    for entry in path_env.split(":"):
        if not os.path.isabs(entry):
            continue
        candidate = os.path.join(entry, command)
        try:
            _check_executable(candidate, command)
        except SpawnError as e:
            if refused is None and os.path.lexists(candidate):
                refused = e
            continue
        return candidate
    raise refused or SpawnError(f"no such program: {command}")


def _check_executable(path: str, command: str) -> None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise SpawnError(f"no such program: {command}") from None
    except OSError as e:
        raise SpawnError(f"cannot use {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpawnError(f"not a regular file: {path}")
    if not os.access(path, os.X_OK):
        raise SpawnError(f"not executable: {path}")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each running job holds a pidfd);
    returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "{event} could not raise RLIMIT_NOFILE from {soft} to {hard}",
                event="jobs.nofile_limit",
                soft=soft,
                hard=hard,
            )
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- spawning --------------------------------------------------------------------------------


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
class JobProcess(_twisted_process.Process):
    """Twisted's Process, started by ``posix_spawn_job`` in a session of its own and
    reaped through a pidfd.

    Twisted's own posix_spawnp path refuses a working directory other than the daemon's and
    cannot start a session, so Twisted would fork instead (about 4x slower); and its reaper
    calls waitpid on every registered child on each SIGCHLD, O(running jobs) per exit.
    Watching each process on its own pidfd makes reaping one job O(1).
    """

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
        # the pid to Twisted's reap-everything table (a waitpid) for _watch_exit to take
        # back.  A job has only descriptors the daemon already opened: spawn, connect the
        # protocol, watch the pidfd.  What Process's other methods use is set here.
        self._reactor = reactor
        self._pidfd_watcher: _PidfdWatcher | None = None
        _twisted_process._BaseProcess.__init__(self, proto)
        self.pipes: dict[int, Any] = {}
        self.pid = posix_spawn_job(  # type: ignore[assignment]
            executable, args, environment, path, childFDs
        )
        self.status = -1
        try:
            proto.makeConnection(self)
        except BaseException:
            log.failure("{event} pid={pid}", event="process.connect_failed", pid=self.pid)
        self._watch_exit()

    def _watch_exit(self) -> None:
        """Watch the child on a pidfd of its own; where there is none (old kernel, a
        reactor without file descriptors), Twisted's SIGCHLD reaper takes it."""
        pid = cast(int, self.pid)
        if IReactorFDSet.providedBy(self._reactor):
            try:
                pidfd = os.pidfd_open(pid)  # always close-on-exec; works on a zombie too
            except (AttributeError, OSError):
                pass
            else:
                self._pidfd_watcher = _PidfdWatcher(self, pid, pidfd)
                self._reactor.addReader(self._pidfd_watcher)
                return
        child_signals.restore()
        _twisted_process.registerReapProcessHandler(pid, self)

    def _reaped(self, status: int) -> None:
        self._pidfd_watcher = None
        self.processEnded(status)

    def _lost(self) -> None:
        """End without a status: ProcessTerminated with neither exit code nor signal."""
        self._pidfd_watcher = None
        self.pid = None
        self.lostProcess += 1
        proto = cast(ProcessProtocol | None, self.proto)
        self.proto = None
        if proto is not None:
            proto.processEnded(Failure(ProcessTerminated(None, None, None)))

    def _watch_lost(self, pid: int) -> None:
        """The pidfd can no longer be watched: hand the pid back to Twisted's reaper."""
        self._pidfd_watcher = None
        if self.pid == pid and pid not in _twisted_process.reapProcessHandlers:
            child_signals.restore()
            _twisted_process.registerReapProcessHandler(pid, self)


@implementer(IReadDescriptor)
class _PidfdWatcher:
    """Readable when the child has exited; then reaps exactly that child."""

    def __init__(self, process: JobProcess, pid: int, pidfd: int) -> None:
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
            self._process._lost()
            return
        if pid == 0:
            # Readable but not waitable (e.g. traced): let Twisted's reaper poll it rather
            # than spin on a level-triggered descriptor.
            self._stop()
            self._process._watch_lost(self._pid)
            return
        self._stop()
        self._process._reaped(status)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped us (shutdown); don't lose the child.
        if self._fd >= 0:
            self._close()
            self._process._watch_lost(self._pid)

    def _stop(self) -> None:
        self._process._reactor.removeReader(self)
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
        if current in (signal.SIG_DFL, signal.SIG_IGN, None) or \
                _twisted_process.reapProcessHandlers:
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


def posix_spawn_job(
    executable: str,
    args: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    fdmap: dict[int, int],
) -> int:
    """posix_spawn ``executable`` as a new session leader in ``cwd`` with exactly the fds of
    ``fdmap`` (child fd -> parent fd), default signal dispositions and nothing blocked;
    returns the pid or raises OSError.  Uses glibc directly when it can (see _LibcSpawn)."""
    if _libc_spawn is not None:
        return _libc_spawn(executable, args, env, cwd, fdmap)
    return _os_posix_spawn(executable, args, env, cwd, fdmap)


def _os_posix_spawn(
    executable: str,
    args: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    fdmap: dict[int, int],
) -> int:
    """Fallback through os.posix_spawn, which (in 3.11) can neither close every other fd
    nor change directory: so list every open fd as Twisted does (O(open fds) per spawn:
    ~1.2 ms with 1,000 jobs' pidfds open) and switch cwd around the call."""
    fd_state = []
    for fd in _twisted_process._listOpenFDs():
        try:
            cloexec = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        fd_state.append((fd, bool(cloexec & fcntl.FD_CLOEXEC)))
    file_actions = _twisted_process._getFileActions(
        fd_state, fdmap, doClose=os.POSIX_SPAWN_CLOSE, doDup2=os.POSIX_SPAWN_DUP2
    )
    # Python ignores SIGPIPE and SIGXFSZ; a job must see the defaults.
    ignored = [n for n in range(1, signal.NSIG) if signal.getsignal(n) == signal.SIG_IGN]
    with _working_directory(cwd):
        return os.posix_spawn(
            executable,
            list(args),
            dict(env),
            file_actions=file_actions,
            setsid=True,
            setsigdef=ignored,
            setsigmask=(),
        )


class _LibcSpawn:
    """glibc's posix_spawn called through ctypes, for the two file actions Python 3.11's
    os.posix_spawn lacks: ``addclosefrom_np(3)`` closes every fd but 0-2 in the child
    without the daemon listing its (1,000+) fds on each spawn, and ``addchdir_np`` changes
    directory in the child rather than in the daemon.  Needs glibc >= 2.34.

    The attributes (new session, every signal to its default, nothing blocked) never
    change, so they are built once; the file actions (chdir, the dup2s, closefrom) are
    built once per directory and descriptor numbers.  Called from the reactor thread only.
    """

    # From glibc's <spawn.h>.
    _SETSIGDEF = 0x04
    _SETSIGMASK = 0x08
    _SETSID = 0x80
    # Opaque glibc structs, allocated with room to spare (x86-64: 80, 336 and 128 bytes).
    _STRUCT_SIZE = 1024

    def __init__(self, libc: ctypes.CDLL) -> None:
        c_void_p, c_int, c_char_p = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        self._spawn = libc.posix_spawn
        self._spawn.argtypes = [
            ctypes.POINTER(ctypes.c_int), c_char_p, c_void_p, c_void_p, c_void_p, c_void_p,
        ]
        self._spawn.restype = c_int
        signatures: dict[str, list[Any]] = {
            "posix_spawn_file_actions_init": [c_void_p],
            "posix_spawn_file_actions_destroy": [c_void_p],
            "posix_spawn_file_actions_adddup2": [c_void_p, c_int, c_int],
            "posix_spawn_file_actions_addclose": [c_void_p, c_int],
            "posix_spawn_file_actions_addclosefrom_np": [c_void_p, c_int],
            "posix_spawn_file_actions_addchdir_np": [c_void_p, c_char_p],
            "posix_spawnattr_init": [c_void_p],
            "posix_spawnattr_setflags": [c_void_p, ctypes.c_short],
            "posix_spawnattr_setsigdefault": [c_void_p, c_void_p],
            "posix_spawnattr_setsigmask": [c_void_p, c_void_p],
            "sigemptyset": [c_void_p],
            "sigfillset": [c_void_p],
        }
        self._fn: dict[str, Any] = {}
        for name, argtypes in signatures.items():
            fn = getattr(libc, name)  # AttributeError: too old a libc
            fn.argtypes = argtypes
            fn.restype = c_int
            self._fn[name] = fn
        # The per-spawn calls, bound once (a dict lookup and a wrapper fewer each).
        self._actions_init = self._fn["posix_spawn_file_actions_init"]
        self._actions_destroy = self._fn["posix_spawn_file_actions_destroy"]
        self._adddup2 = self._fn["posix_spawn_file_actions_adddup2"]
        self._addclose = self._fn["posix_spawn_file_actions_addclose"]
        self._addclosefrom = self._fn["posix_spawn_file_actions_addclosefrom_np"]
        self._addchdir = self._fn["posix_spawn_file_actions_addchdir_np"]
        # Every signal to its default (what exec would do for handled ones; ignored ones
        # would otherwise stay ignored), an empty mask, a new session: the same for every
        # job, so one attribute object serves them all (posix_spawn only reads it).
        self._all = ctypes.create_string_buffer(self._STRUCT_SIZE)
        self._none = ctypes.create_string_buffer(self._STRUCT_SIZE)
        self._call("sigfillset", self._all)
        self._call("sigemptyset", self._none)
        self._attr = ctypes.create_string_buffer(self._STRUCT_SIZE)
        self._call("posix_spawnattr_init", self._attr)
        self._call("posix_spawnattr_setflags", self._attr,
                   self._SETSID | self._SETSIGDEF | self._SETSIGMASK)
        self._call("posix_spawnattr_setsigdefault", self._attr, self._all)
        self._call("posix_spawnattr_setsigmask", self._attr, self._none)
        self._actions: dict[tuple[Any, ...], Any] = {}

    def _call(self, name: str, *args: Any) -> None:
        # posix_spawn* return an error number; sig*set return -1 and set errno.
        _check(name, self._fn[name](*args))

    #: File actions kept built, by (cwd, fd map).  Jobs mostly share a directory and
    #: get the same descriptor numbers back (each start closes its log fds again), so a
    #: handful cover nearly every spawn; building them is seven ctypes calls (~6 us).
    ACTIONS_CACHE = 64

    def __call__(
        self,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        fdmap: dict[int, int],
    ) -> int:
        argv = _c_strings(args)
        envp = _c_strings([f"{k}={v}" for k, v in env.items()])
        key = (cwd, *fdmap.items())
        actions = self._actions.get(key)
        if actions is None:
            actions = self._build_actions(cwd, fdmap)
            if len(self._actions) >= self.ACTIONS_CACHE:
                self._actions_destroy(self._actions.pop(next(iter(self._actions))))
            self._actions[key] = actions
        pid = ctypes.c_int(0)
        rc = self._spawn(
            ctypes.byref(pid), executable.encode(_FS_ENCODING, _FS_ERRORS), actions,
            self._attr, argv, envp,
        )
        if rc != 0:
            raise OSError(rc, os.strerror(rc), executable)
        return pid.value

    def _build_actions(self, cwd: str | None, fdmap: dict[int, int]) -> Any:
        """chdir to ``cwd``, the dup2s of ``fdmap`` (child fd -> parent fd), then close
        every other descriptor.  posix_spawn only reads them, so they can be reused."""
        actions = ctypes.create_string_buffer(self._STRUCT_SIZE)
        _check("posix_spawn_file_actions_init", self._actions_init(actions))
        try:
            if cwd is not None:
                _check("posix_spawn_file_actions_addchdir_np",
                       self._addchdir(actions, cwd.encode(_FS_ENCODING, _FS_ERRORS)))
            if fdmap.keys().isdisjoint(fdmap.values()):
                # The usual case (stdin /dev/null, the two log files, all >= 3): no dup2
                # can clobber another's source, so any order will do.
                for child_fd, parent_fd in fdmap.items():
                    _check("posix_spawn_file_actions_adddup2",
                           self._adddup2(actions, parent_fd, child_fd))
            else:
                # Twisted's planner orders the dup2s so no target clobbers a later source.
                state = [(fd, True) for fd in set(fdmap.values())]
                for action in _twisted_process._getFileActions(state, fdmap, doClose=0,
                                                               doDup2=1):
                    if action[0] == 1:
                        _check("posix_spawn_file_actions_adddup2",
                               self._adddup2(actions, *action[1:]))
                    else:
                        _check("posix_spawn_file_actions_addclose",
                               self._addclose(actions, action[1]))
            _check("posix_spawn_file_actions_addclosefrom_np",
                   self._addclosefrom(actions, max(fdmap) + 1))
        except BaseException:
            self._actions_destroy(actions)
            raise
        return actions


_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def _check(name: str, rc: int) -> None:
    """posix_spawn* return an error number; sig*set return -1 and set errno."""
    if rc != 0:
        code = rc if rc > 0 else ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")


def _c_strings(items: Sequence[str]) -> Any:
    """A NULL-terminated ``char *[]`` of ``items`` encoded as os.fsencode would; ctypes
    keeps the bytes alive with the array."""
    encoded = [item.encode(_FS_ENCODING, _FS_ERRORS) for item in items]
    for item in encoded:
        if b"\0" in item:
            raise ValueError("embedded NUL byte")
    return (ctypes.c_char_p * (len(encoded) + 1))(*encoded, None)


def _load_libc_spawn() -> _LibcSpawn | None:
    try:
        return _LibcSpawn(ctypes.CDLL(None, use_errno=True))
    except (AttributeError, OSError):
        return None


# None where glibc lacks the _np actions (musl, glibc < 2.34): os.posix_spawn is used then.
_libc_spawn: _LibcSpawn | None = _load_libc_spawn()


class _working_directory:
    """Spawn in ``path`` by switching the daemon's cwd around the posix_spawn call.

    Python's posix_spawn has no chdir file action.  Switching is safe because the daemon
    resolves every path it uses to an absolute one and does this only in the reactor
    thread, with no yield between the two fchdir calls; returning via an fd to the old
    directory works even if that directory was renamed meanwhile.
    """

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._home = -1

    def __enter__(self) -> None:
        if self._path is None:
            return
        target = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fchdir(target)
            except BaseException:
                os.close(self._home)
                self._home = -1
                raise
        finally:
            os.close(target)

    def __exit__(self, *exc_info: object) -> None:
        if self._home < 0:
            return
        try:
            os.fchdir(self._home)
        finally:
            os.close(self._home)
            self._home = -1


__all__ = [
    "ChildSignals",
    "JobProcess",
    "JobProcessProtocol",
    "QuietChildSignals",
    "SpawnError",
    "check_directory",
    "raise_nofile_limit",
    "resolve_program",
    "spawn",
]
