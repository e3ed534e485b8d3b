"""posix_spawn for jobs: a new session in the job's directory with exactly the descriptors
given, through glibc where it can (``_LibcSpawn``), else through ``os.posix_spawn``.

Why not ``reactor.spawnProcess``: Twisted's own posix_spawnp path refuses a working
directory other than the daemon's and cannot start a session, so Twisted would fork
instead (about 4x slower).  Called from the reactor thread only.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from jobworker._twisted import open_fds, plan_file_actions


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
    for fd in open_fds():
        try:
            cloexec = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        fd_state.append((fd, bool(cloexec & fcntl.FD_CLOEXEC)))
    file_actions = plan_file_actions(fd_state, fdmap, os.POSIX_SPAWN_CLOSE,
                                     os.POSIX_SPAWN_DUP2)
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
                for action in plan_file_actions(state, fdmap, 0, 1):
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
