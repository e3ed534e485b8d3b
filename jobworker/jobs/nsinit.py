"""The helper an isolated job starts in (``python -I -S .../nsinit.py``): as root,
it unshares the namespaces asked for and sets them up, takes the job's user, then runs the
program; with a PID namespace it stays as the namespace's init, forwarding signals and
reaping, and ends with the program's status.

posix_spawn cannot unshare, so the daemon spawns this instead of the program.  It imports
only the standard library's small modules, never jobworker (it runs as a file, without
``site``: its start-up is what isolation costs), and is
single-threaded, so the glibc wrappers (``os.setresuid``...) change the whole process, as
they must here.  Python 3.11 has no ``os.unshare`` or ``mount``: libc's, through ctypes.

Command line: ``--ns pid,net,mount [--uid N --gid N --groups A,B] -- EXECUTABLE ARGV0
ARGS...``, or ``--probe``.  The job's environment arrives as ``JOBWORKER_NSENV_<i>=K=V``
variables, never as the helper's own: a root process must not honour the job's
``LD_PRELOAD`` and the like.
"""

from __future__ import annotations

# _signal, not signal: the same functions and numbers (signal wraps them in enums), without
# importing enum and functools, a fifth of the helper's start-up.
import _signal as signal
import ctypes
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost the helper ~5 ms
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

NAMESPACES = ("pid", "net", "mount")
#: Prefix of the variables that carry the job's environment, in order.
ENV_PREFIX = "JOBWORKER_NSENV_"

# <linux/sched.h>, <linux/mount.h>, <linux/sockios.h>, <linux/if.h>, <linux/prctl.h>.
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4

FLAGS = {"pid": CLONE_NEWPID, "net": CLONE_NEWNET, "mount": CLONE_NEWNS}
#: What the init forwards to the program's process group (as the daemon sends them).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)

# Exit statuses of the helper itself, as env(1) and docker run use them.
SETUP_FAILED = 125
CANNOT_EXECUTE = 126
NOT_FOUND = 127

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A namespace could not be made or set up: the job ends with SETUP_FAILED."""


class Plan:
    """What the command line asks for."""

    __slots__ = ("namespaces", "uid", "gid", "groups", "executable", "argv")

    def __init__(self, namespaces: tuple[str, ...], uid: int | None, gid: int | None,
                 groups: tuple[int, ...], executable: str, argv: list[str]) -> None:
        self.namespaces = namespaces
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.executable = executable
        self.argv = argv


def effective(asked: Sequence[str]) -> tuple[str, ...]:
    """The namespaces a job gets, in canonical order: a new ``/proc`` for a PID namespace
    needs a mount namespace, so ``pid`` brings ``mount``."""
    wanted = set(asked)
    if "pid" in wanted:
        wanted.add("mount")
    return tuple(ns for ns in NAMESPACES if ns in wanted)


def parse(args: Sequence[str]) -> Plan:
    """The plan of a command line (the helper's arguments); ValueError if bad."""
    options: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i] != "--":
        if args[i] not in ("--ns", "--uid", "--gid", "--groups") or i + 1 >= len(args):
            raise ValueError(f"bad option {args[i]!r}")
        options[args[i]] = args[i + 1]
        i += 2
    rest = list(args[i + 1:])
    if len(rest) < 2:
        raise ValueError("no program after --")
    namespaces = tuple(n for n in options.get("--ns", "").split(",") if n)
    if not namespaces or any(n not in NAMESPACES for n in namespaces):
        raise ValueError(f"bad --ns {options.get('--ns')!r}")
    uid = int(options["--uid"]) if "--uid" in options else None
    gid = int(options["--gid"]) if "--gid" in options else None
    if (uid is None) != (gid is None):
        raise ValueError("--uid and --gid go together")
    groups = tuple(int(g) for g in options.get("--groups", "").split(",") if g)
    return Plan(effective(namespaces), uid, gid, groups, rest[0], rest[1:])


def job_environment(environ: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The job's environment, from the ``JOBWORKER_NSENV_<i>`` variables, in order."""
    prefix = ENV_PREFIX.encode()
    entries = sorted((int(k[len(prefix):]), v) for k, v in environ.items()
                     if k.startswith(prefix) and k[len(prefix):].isdigit())
    env: dict[bytes, bytes] = {}
    for _, entry in entries:
        key, _, value = entry.partition(b"=")
        env[key] = value
    return env


# -- system calls ----------------------------------------------------------------------

def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


def unshare(namespaces: Sequence[str]) -> None:
    flags = 0
    for ns in namespaces:
        flags |= FLAGS[ns]
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({','.join(namespaces)})")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    def c(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    _check(_libc.mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(data)),
           f"mount {fstype or 'private'} on {target}")


def private_tmp() -> None:
    """Nothing mounted here reaches the host (``/`` recursively private), then an empty
    tmpfs on ``/tmp``, world-writable and sticky as ``/tmp`` is."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def loopback_up() -> None:
    """Bring ``lo`` up in the new network namespace (SIOCSIFFLAGS; no ``ip`` needed)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = struct.pack("16sH22x", b"lo", 0)  # struct ifreq: name, flags, padding
            flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
        except OSError as e:
            raise SetupError(f"bring lo up: {e.strerror}") from None


def take_user(plan: Plan) -> None:
    """Become the job's user for good (real, effective and saved ids)."""
    if plan.uid is None or plan.gid is None:
        return
    try:
        os.setgroups(list(plan.groups))
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    except OSError as e:
        raise SetupError(f"take uid {plan.uid} gid {plan.gid}: {e.strerror}") from None


# -- running the program ---------------------------------------------------------------

def _say(message: str) -> None:
    """One line on the job's stderr (its log)."""
    try:
        os.write(2, f"jobworker-nsinit: {message}\n".encode(errors="replace"))
    except OSError:
        pass


def execute(plan: Plan, env: dict[bytes, bytes]) -> NoReturn:
    """Replace this process with the program: signals as the daemon's spawn leaves them
    (Python ignores SIGPIPE and SIGXFSZ), the directory checked as the job's user."""
    for n in range(1, signal.NSIG):
        try:
            if n in FORWARDED or signal.getsignal(n) == signal.SIG_IGN:
                signal.signal(n, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL, SIGSTOP, real-time signals Python does not name
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        os.chdir(".")  # the user may not be allowed in: as posix_spawn's chdir would say
        os.execve(plan.executable, [os.fsencode(a) for a in plan.argv], env)
    except OSError as e:
        _say(f"cannot execute {plan.executable}: {e.strerror}")
        os._exit(NOT_FOUND if isinstance(e, FileNotFoundError) else CANNOT_EXECUTE)


def end_like(status: int) -> NoReturn:
    """End this process as the program ended: its exit code, or killed by its signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program dumped core, not us
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # a signal whose default is not to end a process
    os._exit(os.waitstatus_to_exitcode(status))


def run_init(plan: Plan, env: dict[bytes, bytes], report: int) -> NoReturn:
    """PID 1 of the new namespace: mount its ``/proc``, start the program in a process
    group of its own, forward signals to that group, reap every child, and write the
    program's wait status to ``report`` before ending (which ends the namespace).

    The forwarded signals arrive blocked (see ``main``) and stay so until the program's
    group exists: one that came meanwhile is passed on then, never lost."""
    program: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if program:
            try:
                os.killpg(program[0], signum)
            except ProcessLookupError:
                pass

    for signum in FORWARDED:
        signal.signal(signum, forward)  # an init gets only signals it handles
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        take_user(plan)
    except SetupError as e:
        _say(str(e))
        os._exit(SETUP_FAILED)
    # Set after the change of user, which clears it: if the helper outside dies, so do we.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        os.close(report)
        os.setpgid(0, 0)
        execute(plan, env)
    try:
        os.setpgid(pid, pid)  # as the child does: whichever runs first
    except OSError:
        pass  # it has exec'd or ended already
    program.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    while True:
        try:
            child, status = os.wait()
        except ChildProcessError:
            os._exit(SETUP_FAILED)
        if child == pid:
            os.write(report, status.to_bytes(4, "little"))
            os._exit(0)  # and the kernel ends whatever is left in the namespace


def run_outside(init: int, report: int) -> NoReturn:
    """The job's leader, outside the namespace: wait for its init and end as the program
    did.  Signals the daemon sends the job's group reach the init directly; here they are
    only kept from ending this process early."""
    while True:
        try:
            _, status = os.waitpid(init, 0)
            break
        except ChildProcessError:
            os._exit(SETUP_FAILED)
    reported = b""
    while chunk := os.read(report, 4):
        reported += chunk
    if len(reported) == 4:
        end_like(int.from_bytes(reported, "little"))
    end_like(status)  # the init itself failed or was killed


def _ignore(signum: int, frame: object) -> None:
    pass


def main(args: Sequence[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if args is None else args
    if list(args) == ["--probe"]:
        probe()
    try:
        plan = parse(args)
    except ValueError as e:
        _say(f"usage: {e}")
        os._exit(SETUP_FAILED)
    env = job_environment(dict(os.environb))
    try:
        if "pid" in plan.namespaces:
            # Before anything else: a stop may come at once.  Held (not lost, not ending
            # this leader) until there is an init to pass it to.
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        unshare(plan.namespaces)
        if "mount" in plan.namespaces:
            private_tmp()
        if "net" in plan.namespaces:
            loopback_up()
        if "pid" not in plan.namespaces:
            take_user(plan)
            execute(plan, env)
        read_end, write_end = os.pipe()
        init = os.fork()
    except SetupError as e:
        _say(str(e))
        os._exit(SETUP_FAILED)
    except OSError as e:
        _say(f"fork: {e.strerror}")
        os._exit(SETUP_FAILED)
    if init == 0:
        os.close(read_end)
        run_init(plan, env, write_end)
    os.close(write_end)
    # What came during the set-up is pending here only (a child starts with none): pass it
    # on to the init, which holds it until the program runs.  What comes from now on
    # reaches the init directly, in the job's process group; here it is only kept from
    # ending this process early.
    for signum in signal.sigpending():
        if signum in FORWARDED:
            os.kill(init, signum)
    for signum in FORWARDED:
        signal.signal(signum, _ignore)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    try:
        take_user(plan)
    except SetupError as e:
        _say(str(e))  # the init runs the program all the same, as the job's user
    run_outside(init, read_end)


def probe() -> NoReturn:
    """Whether this host lets us make every namespace and set it up: exit 0, or 1 with
    the reason on stderr.  Run by the daemon in a throwaway process of its own."""
    try:
        unshare(NAMESPACES)
        private_tmp()
        loopback_up()
        pid = os.fork()
        if pid == 0:
            try:
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            except SetupError as e:
                _say(str(e))
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    except SetupError as e:
        _say(str(e))
        os._exit(1)
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
