"""Where job output lives on disk: the only module that names log paths and makes log files.

A job's child writes straight into its files (they are its fds 1 and 2), so the daemon never
copies output; readers (``jobworker.daemon.follow``) open the files again by path.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobworker.jobs.placement import SpreadWhenSlow, spread_subdirectories
from jobworker.wire.timestamps import UTCStamp

STREAMS = ("stdout", "stderr")

_DIR_MODE = 0o750
_FILE_MODE = 0o640
# Spare directories wait here (see jobworker.jobs.logpool); a job id never starts with ".", so
# no job's directory can be called this.
_SPARE = ".spare"


_stamp = UTCStamp("%Y%m%dT%H%M%S")

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

    def __init__(self, root: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.root = os.path.abspath(root)
        self._spare_root = os.path.join(self.root, _SPARE)
        self._umask_cache: int | None = None
        self._placement = SpreadWhenSlow(self.root, clock)

    @property
    def spreading(self) -> bool:
        """Whether the root is marked to spread job directories now."""
        return self._placement.spreading

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
        self._placement.start_plain()
        if os.path.isdir(self._spare_root):
            spread_subdirectories(self._spare_root)

    @property
    def _umask(self) -> int:
        """The daemon's umask: decides whether modes need an explicit chmod."""
        if self._umask_cache is None:
            self._umask_cache = current_umask()
        return self._umask_cache

    def dir_for(self, job_id: str, started: float) -> str:
        """The directory ``create_at`` makes for this job (absolute)."""
        if not job_id or "/" in job_id or job_id.startswith(".") or "\0" in job_id:
            raise ValueError(f"unsafe job id for a path: {job_id!r}")
        return os.path.join(self.root, f"{job_id}-{stamp(started)}")

    def made_for(self, job_ids: set[str]) -> dict[str, str]:
        """Which of ``job_ids`` have a log folder (``dir_for``'s, whatever its time): at
        start-up, a queued job with one was being launched when the daemon stopped."""
        if not job_ids:
            return {}
        found: dict[str, str] = {}
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return {}
        for name in names:
            job_id = name.rpartition("-")[0]  # the stamp has no "-"
            if job_id in job_ids:
                found[job_id] = os.path.join(self.root, name)
        return found

    def create_at(self, log_dir: str) -> tuple[int, int]:
        """Make a directory ``dir_for`` named with its empty ``stdout.log`` and
        ``stderr.log``, and return them open for appending (close-on-exec): the spawn hands
        them to the child as fds 1 and 2, and the caller closes these copies.  Timed, to
        mark the root while making directories in it is slow (reactor thread only: spares
        are made elsewhere)."""
        clock = self._placement.clock
        began = clock()
        fds = self._make(log_dir)
        self._placement.made(began, clock())
        return fds

    # -- spares (made ahead of time by jobworker.jobs.logpool) ----------------------------------

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
