"""Where job output lives on disk: the only module that names log paths and opens log files.

A job's child writes straight into its files (they are its fds 1 and 2), so the daemon never
copies output; readers come back later through ``read_range`` and ``size``.
"""

from __future__ import annotations

import array
import fcntl
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobworker.messages import UTCStamp

STREAMS = ("stdout", "stderr")

_DIR_MODE = 0o750
_FILE_MODE = 0o640
_MAX_READ = 1 << 20  # one pread at a time; callers bound their own total
# Spare directories wait here (see jobworker.logpool); a job id never starts with ".", so
# no job's directory can be called this.
_SPARE = ".spare"


_stamp = UTCStamp("%Y%m%dT%H%M%S")

#: FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (``_IOR/_IOW('f', 1/2, long)``) where the ioctl number
#: layout is Linux's generic one and long is 8 bytes; elsewhere nothing is tried.
_FLAGS_IOCTLS = (0x80086601, 0x40086602) if platform.machine() in ("x86_64", "aarch64") \
    else None
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(path: str, on: bool = True) -> bool:
    """Mark ``path`` a top of directory hierarchies (``chattr +T``, FS_TOPDIR_FL), or take
    the mark off (``on=False``): ext2/3/4 place each new subdirectory of a marked directory
    in a block group of its own choosing (Orlov) instead of its parent's.  Best effort:
    False where the file system has no such flag.

    Why: for minutes after many files were deleted, ext4 without a journal skips every
    recently freed inode of a group when allocating one, searching the parent's group
    first, and a log root's group is exactly where deleted job directories were.  A job
    directory and its two files on this machine's disk (``bench/fs_topdir.py``): plain
    30-40 us on a quiet disk but 230-930 us right after deletions; marked a steady 70-95
    us.  So ``LogStore`` marks its root only while plain placement is slow.
    """
    if _FLAGS_IOCTLS is None:
        return False
    get, set_ = _FLAGS_IOCTLS
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, get, flags)
        wanted = flags[0] | _FS_TOPDIR_FL if on else flags[0] & ~_FS_TOPDIR_FL
        if wanted != flags[0]:
            flags[0] = wanted
            fcntl.ioctl(fd, set_, flags)
        return True
    except OSError:  # not ext2/3/4 (ENOTTY, EOPNOTSUPP), or not allowed (EPERM)
        return False
    finally:
        os.close(fd)


def stamp(when: float) -> str:
    """A filesystem-safe, sortable UTC timestamp such as ``20261128T041000.123456Z``."""
    return _stamp(when)


@dataclass(frozen=True)
class JobLogs:
    """The log directory of one job and the two files in it."""

    dir: str

    @property
    def stdout_path(self) -> str:
        return os.path.join(self.dir, "stdout.log")

    @property
    def stderr_path(self) -> str:
        return os.path.join(self.dir, "stderr.log")

    def path(self, stream: str) -> str:
        """The file of ``stream`` ("stdout" or "stderr")."""
        if stream == "stdout":
            return self.stdout_path
        if stream == "stderr":
            return self.stderr_path
        raise ValueError(f"unknown stream: {stream!r}")

    def open_for_child(self) -> tuple[int, int]:
        """Open (stdout, stderr) for appending, close-on-exec: the spawn dup2s them into the
        child and the caller closes these copies right after spawning."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        out = os.open(self.stdout_path, flags)
        try:
            err = os.open(self.stderr_path, flags)
        except BaseException:
            os.close(out)
            raise
        return out, err


def current_umask() -> int:
    """The process's umask, read without changing it (``Umask:`` in /proc/self/status), so
    no other thread can create a file in a set-and-restore window; where /proc lacks the
    field (Linux < 4.7), set-and-restore, which callers do before starting threads."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class LogStore:
    """Owns the log root (the daemon passes ``<state-dir>/logs``, made 0750 on first use);
    each job gets ``<root>/<job id>-<start stamp>/``, either made at its start or a spare
    made earlier (``make_spare``) and renamed to that name (``adopt_spare``).

    Safe to use from a worker thread as well as the reactor thread once the umask is known
    (``read_umask``).
    """

    #: Job directories made slower than this (a moving average of wall time) have the
    #: root marked to spread them (``spread_subdirectories``) ...
    SLOW_MKDIR = 200e-6
    #: ... for this long; then the mark comes off, to see whether plain placement (about
    #: half the cost of spreading on a quiet disk) is cheap again.
    SPREAD_HOLD = 60.0

    def __init__(self, root: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.root = os.path.abspath(root)
        self._spare_root = os.path.join(self.root, _SPARE)
        self._umask_cache: int | None = None
        self._clock = clock
        self._mkdir_cost = 0.0
        self._spread_since: float | None = None
        self._can_spread = True

    @property
    def spreading(self) -> bool:
        """Whether the root is marked to spread job directories now."""
        return self._spread_since is not None

    def read_umask(self) -> None:
        """Take the daemon's umask now (at service start: twistd may set it after start-up,
        when it daemonizes), before any thread makes files here."""
        self._umask_cache = current_umask()

    def prepare(self) -> None:
        """At service start: make the log root if it is missing, unmarked (plain placement
        until it proves slow), and mark the spares' root, whose directories are made off the
        reactor thread (``spread_subdirectories``).  Best effort: a root that cannot be made
        now fails each job with the reason instead, as before."""
        try:
            self._make_root()
        except OSError:
            return
        spread_subdirectories(self.root, on=False)
        self._spread_since = None
        if os.path.isdir(self._spare_root):
            spread_subdirectories(self._spare_root)

    @property
    def _umask(self) -> int:
        """The daemon's umask: decides whether modes need an explicit chmod."""
        if self._umask_cache is None:
            self._umask_cache = current_umask()
        return self._umask_cache

    def dir_for(self, job_id: str, started: float) -> str:
        """The directory ``create`` makes for this job (absolute)."""
        if not job_id or "/" in job_id or job_id.startswith(".") or "\0" in job_id:
            raise ValueError(f"unsafe job id for a path: {job_id!r}")
        return os.path.join(self.root, f"{job_id}-{stamp(started)}")

    def create(self, job_id: str, started: float) -> JobLogs:
        """Make the job's directory and its empty ``stdout.log`` and ``stderr.log``."""
        logs, out, err = self.create_open(job_id, started)
        os.close(out)
        os.close(err)
        return logs

    def create_open(self, job_id: str, started: float) -> tuple[JobLogs, int, int]:
        """``create``, returning the two files open for appending (close-on-exec): the
        spawn hands them to the child as fds 1 and 2; the caller closes these copies."""
        logs = JobLogs(self.dir_for(job_id, started))
        out, err = self.create_at(logs.dir)
        return logs, out, err

    def create_at(self, log_dir: str) -> tuple[int, int]:
        """``create_open`` for a directory ``dir_for`` named: its (stdout, stderr) fds.
        Timed, to mark the root while making directories in it is slow (reactor thread
        only: spares are made elsewhere)."""
        began = self._clock()
        fds = self._make(log_dir)
        now = self._clock()
        self._mkdir_cost += (now - began - self._mkdir_cost) / 4
        if self._spread_since is None:
            if self._mkdir_cost > self.SLOW_MKDIR and self._can_spread:
                if spread_subdirectories(self.root):
                    self._spread_since = now
                else:  # not ext2/3/4: no use asking again for every job
                    self._can_spread = False
        elif now - self._spread_since > self.SPREAD_HOLD:
            spread_subdirectories(self.root, on=False)
            self._spread_since = None
            self._mkdir_cost = 0.0
        return fds

    # -- spares (made ahead of time by jobworker.logpool) ----------------------------------

    def make_spare(self, group: str, name: str) -> tuple[str, int, int]:
        """Make ``<root>/.spare/<group>/<name>/`` holding empty log files exactly as
        ``create_at`` would (same modes, same open flags); returns its path and the two
        fds.  (Spares come in groups so that making one never locks the directory another
        is being renamed out of.)"""
        group_dir = os.path.join(self._spare_root, group)
        path = os.path.join(group_dir, name)
        try:
            out, err = self._make(path)
        except FileNotFoundError:
            self._make_root()
            self._make_dir(self._spare_root, spread=True)
            self._make_dir(group_dir)
            out, err = self._make(path)
        return path, out, err

    def adopt_spare(self, spare_dir: str, log_dir: str) -> None:
        """Give a spare the job's name (``log_dir`` from ``dir_for``).  A rename in one
        file system: atomic, and no inode to allocate.  The target never exists: job ids
        are fresh UUIDs."""
        os.rename(spare_dir, log_dir)

    def sweep_spares(self) -> None:
        """Remove every spare directory (leftovers of a daemon that did not stop cleanly,
        or this one's at its stop); files still open elsewhere stay valid until closed."""
        shutil.rmtree(self._spare_root, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------

    def _make(self, path: str) -> tuple[int, int]:
        """mkdir ``path`` (its parent made if the log root is missing) and create its two
        files, open for appending and close-on-exec."""
        try:
            os.mkdir(path, _DIR_MODE)
        except FileNotFoundError:
            self._make_root()
            os.mkdir(path, _DIR_MODE)
        # Modes are set explicitly when the daemon's umask would narrow them.
        umask = self._umask
        if umask & _DIR_MODE:
            os.chmod(path, _DIR_MODE)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fds: list[int] = []
        try:
            for name in ("stdout.log", "stderr.log"):
                fd = os.open(os.path.join(path, name), flags, _FILE_MODE)
                fds.append(fd)
                if umask & _FILE_MODE:
                    os.fchmod(fd, _FILE_MODE)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds[0], fds[1]

    def _make_root(self) -> None:
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        self._make_dir(self.root)

    def _make_dir(self, path: str, spread: bool = False) -> None:
        """mkdir 0750 whatever the umask; an existing one is left as it is.  ``spread``:
        see ``spread_subdirectories``."""
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            return
        os.chmod(path, _DIR_MODE)
        if spread:
            spread_subdirectories(path)


def size(path: str) -> int:
    """The current length of a log file in bytes."""
    return os.stat(path).st_size


def read_range(path: str, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``offset``; shorter only at end of file.

    Blocking file I/O: keep calls small, or off the reactor thread for large ranges.
    """
    if offset < 0 or size < 0:
        raise ValueError("offset and size must be non-negative")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while size > 0:
            chunk = os.pread(fd, min(size, _MAX_READ), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
