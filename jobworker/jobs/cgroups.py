"""The kernel's cgroup files for jobs: finding the daemon's own cgroups, making, renaming and
removing job cgroups in a subtree beneath them, moving the spawning thread in and out, and
reading what a job used.  Two implementations of one small interface: v1 (one hierarchy per
controller) and v2 (the unified hierarchy).  Blocking file I/O, each call small; making and
removing cgroups belongs in a worker thread (``jobworker.jobs.cgpool``).

Layout: ``<own>/<root_name>/<job id>`` in each hierarchy used, where ``<own>`` is the
daemon's cgroup there (``/proc/thread-self/cgroup``), so a job's cgroup is found from its id
alone (``CgroupDriver.paths``).  Nothing outside ``<own>/<root_name>`` is ever made, written
or removed, except that the spawning thread writes itself back into ``<own>``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

#: The v1 controllers every job gets a cgroup in (those mounted): freezer makes the KILL
#: race-free, cpuacct, memory and blkio count.
CONTROLLERS_V1 = ("memory", "cpuacct", "blkio", "freezer")
#: Joined only by jobs with that limit (unless co-mounted with one above): they count
#: nothing the others do not, and each hierarchy costs every spawn two thread moves and
#: every job a cgroup to make and remove; moving a thread into a new cpu cgroup and back
#: alone costs ~0.5 ms of wall time (median, this host).
ON_DEMAND_V1 = ("cpu", "pids")
CPU_V1 = "cpu"
#: The v1 throttle files of a read and a write limit ("MAJ:MIN bytes" per line; 0 lifts).
THROTTLE_V1 = ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device")
#: The CFS period a CPU limit is a quota of (the kernel's default, 100 ms).
CPU_PERIOD_US = 100_000
#: The v2 controllers enabled for jobs when the daemon's cgroup offers them.
CONTROLLERS_V2 = ("memory", "cpu", "io", "pids")

#: Sends a signal to a pid: ``os.kill``; tests pass a recorder.
Kill = Callable[[int, int], None]
#: Makes one cgroup directory: ``os.mkdir``; a fake tree also writes the kernel's files.
Mkdir = Callable[[str], None]
#: Removes one empty cgroup directory: ``os.rmdir`` (the kernel's files go with it).
Rmdir = Callable[[str], None]


class CgroupFiles(Protocol):
    """One job's cgroup (one directory per hierarchy), its descriptors for moving the
    spawning thread kept open from ``CgroupDriver.open`` until ``close``."""

    name: str

    def enter(self) -> None:
        """Move the calling thread (v2: the daemon) into this cgroup: a child spawned now
        starts inside it, before its first instruction."""

    def leave(self) -> None:
        """Move the calling thread (v2: the daemon) back into the daemon's own cgroup."""

    def pids(self) -> list[int]:
        """The processes in the cgroup now (empty: the job is over)."""

    def freeze(self) -> bool:
        """Start freezing every task (no more forks); False if this cgroup cannot."""

    def frozen(self) -> bool:
        """Whether freezing has completed."""

    def thaw(self) -> None:
        """Let frozen tasks run again (a KILLed task dies only once thawed)."""

    def kill_all(self, kill: Kill) -> int:
        """SIGKILL every process in the cgroup (v2: ``cgroup.kill``, atomic; v1: each pid,
        race-free only while frozen); returns how many were signalled (v2: -1, unknown)."""

    def usage(self) -> dict[str, Any]:
        """``cpu_seconds``, ``memory_peak``, ``io_read_bytes``, ``io_write_bytes`` (None
        where this host cannot count it)."""

    def recycle(self, name: str) -> None:
        """Make this empty cgroup as good as new under ``name`` (a fresh job id): counters
        and limits reset, renamed in every hierarchy, descriptors kept.  OSError where the
        kernel cannot (v2 has no rename): remove it instead."""

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        """Limit the job, before it starts: bytes of memory (then the kernel's OOM killer
        acts in the cgroup), cores of CPU time, number of processes (forks fail)."""

    def set_io(self, devices: Sequence[str], read: int | None, write: int | None) -> None:
        """Limit the job's reads and writes on each block device (``MAJ:MIN`` of a whole
        disk) to so many bytes per second, before it starts.  v1 throttles reads and direct
        writes only: buffered writes reach the disk from the kernel's flusher threads."""

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this cgroup for want of memory."""

    def oom_notifier(self) -> int | None:
        """A new non-blocking descriptor that becomes readable when this cgroup runs out of
        memory (v1: an eventfd, signalled just before the OOM killer picks a process; v2:
        inotify on ``memory.events``, which also changes for other memory events), for the
        caller to watch, drain and close; None where it cannot be had (then poll
        ``oom_kills``)."""

    def close(self) -> None:
        """Close the descriptors held open."""


class CgroupDriver(Protocol):
    """The job subtree in one cgroup version."""

    version: str
    #: Controllers jobs get (v1: hierarchies; v2: enabled in the subtree).
    controllers: tuple[str, ...]
    #: The subtree's directories, one per hierarchy.
    roots: tuple[str, ...]
    #: v2's ``cgroup.kill`` ends every process at once; v1 needs the freezer.
    atomic_kill: bool

    def setup(self) -> None:
        """Make the subtree (and on v2 enable controllers for it)."""

    def paths(self, name: str) -> list[str]:
        """The directories of the cgroup called ``name`` (a job id), whether or not they
        exist: what a restarted daemon would look in for a job."""

    def create(self, name: str) -> None:
        """Make cgroup ``name`` in every hierarchy (existing ones are kept)."""

    def remove(self, name: str) -> None:
        """Remove cgroup ``name`` everywhere; OSError(EBUSY) while a process is in it."""

    def children(self) -> list[str]:
        """The names of the cgroups in the subtree (jobs and spares, ours or a previous
        daemon's)."""

    def open(self, name: str) -> CgroupFiles:
        """Open cgroup ``name`` (which must exist) for moving threads and reading."""

    def teardown(self) -> None:
        """Remove the subtree if nothing is left in it; close the daemon's descriptors."""


# -- reading the kernel's files ------------------------------------------------------------


def _read(path: str) -> str:
    # os-level: a third of the cost of open() in text mode for these small files.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def _keep(path: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor held open on a cgroup file that is read (or reset) again and again:
    one ``pread`` then costs ~2 us against ~30 us to open, read and close the file; -1
    where this host has no such file.  A descriptor follows its cgroup through a rename;
    once the cgroup is removed, reads fail with ENODEV."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError:
        return -1


def _pread_all(fd: int) -> bytes:
    """All of a file held open (``_keep``): a cgroup file is a seq_file, which starts
    over at offset 0 and hands out at most a page per read, so read until nothing comes."""
    data = os.pread(fd, 65536, 0)
    if not data:
        return data
    chunks, offset = [data], len(data)
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _pread_int(fd: int) -> int | None:
    """The number a one-value file held open starts with (one read: a single line);
    None where there is no such file or it cannot be read."""
    if fd < 0:
        return None
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _reset(fd: int, value: bytes) -> None:
    """Write ``value`` to a file held open (~2 us against ~9 us to open, write and close
    it).  At offset 0 and then truncated, as the shell's ``echo 0 > file``: the kernel
    ignores both; a fake tree's regular file then reads back what was written."""
    if fd >= 0:
        os.pwrite(fd, value, 0)
        os.ftruncate(fd, len(value))


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _write(path: str, text: str) -> None:
    # O_TRUNC as the shell's ``echo 0 > file``: the kernel ignores it; a fake tree's
    # regular files then read back what was written.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_IN_MODIFY = 0x2


def _inotify(path: str) -> int:
    """A non-blocking inotify descriptor watching ``path`` for changes (the standard
    library has no inotify)."""
    fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, os.strerror(e), path)
    return fd


def _pids_in(fd: int) -> list[int]:
    """The pids listed in an open ``cgroup.procs``; [] if the cgroup is gone (ENODEV: it
    was removed while the file was open)."""
    try:
        return [int(p) for p in _pread_all(fd).split()]
    except OSError as e:
        if e.errno == errno.ENODEV:
            return []
        raise


def _kill_each(pids: list[int], kill: Kill) -> int:
    sent = 0
    for pid in pids:
        try:
            kill(pid, signal.SIGKILL)
            sent += 1
        except ProcessLookupError:
            pass
    return sent


def _open_tasks(dirs: list[str], file: str) -> list[int]:
    fds: list[int] = []
    try:
        for d in dirs:
            fds.append(os.open(os.path.join(d, file), os.O_WRONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _need(dirs: dict[str, str], controller: str) -> None:
    if controller not in dirs:
        raise OSError(errno.ENOTSUP, f"no {controller} controller mounted for this limit")


def _rmdir_all(dirs: list[str], rmdir: Rmdir = os.rmdir) -> None:
    """rmdir each; ENOENT is success, the first other error is raised after trying all."""
    error: OSError | None = None
    for d in dirs:
        try:
            rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            error = error or e
    if error is not None:
        raise error


# -- v1 --------------------------------------------------------------------------------------


#: Written to a v1 ``tasks`` file: the calling thread.  The kernel then moves that one
#: thread without write-locking every thread group on the host (cgroup_threadgroup_rwsem,
#: which every fork and exit on the host takes for reading; kernel/cgroup/cgroup.c,
#: cgroup_procs_write_start): 4-5% more starts/s than writing the thread's id
#: (``bench/ab.py``, 2 x 16 rounds).
_THIS_THREAD = b"0"

#: The limit file of each ON_DEMAND_V1 controller, and what lifts its limit.
_LIMIT_FILE = {"pids": "pids.max", CPU_V1: "cpu.cfs_quota_us"}
_NO_LIMIT = {"pids": b"max", CPU_V1: b"-1"}


class _Extra:
    """A job's cgroup in an on-demand hierarchy: its directory, its ``tasks`` and its
    limit file (held open)."""

    __slots__ = ("path", "tasks", "limit")

    def __init__(self, path: str, tasks: int, limit: int) -> None:
        self.path = path
        self.tasks = tasks
        self.limit = limit


class V1Files:
    """A job's v1 cgroups.  Membership in v1 is per thread: ``enter`` moves the calling
    thread into each ``tasks`` file, so only the spawning thread moves."""

    def __init__(self, name: str, dirs: dict[str, str], home_fds: list[int],
                 extra: dict[str, tuple[str, int]] | None = None,
                 fs: tuple[Mkdir, Rmdir] = (os.mkdir, os.rmdir)) -> None:
        """``extra``: for each ON_DEMAND_V1 controller mounted apart from ``dirs``, where
        this job's cgroup there would go and the daemon's own ``tasks`` in it (joined by
        ``set_limits`` when the job has that limit).  ``fs``: how to make and remove a
        cgroup directory."""
        self.name = name
        self._dirs = dirs  # controller -> this cgroup's directory (co-mounted share one)
        self._fs = fs
        unique = list(dict.fromkeys(dirs.values()))
        self._tasks = _open_tasks(unique, "tasks")
        self._task_fd = dict(zip(unique, self._tasks, strict=True))
        self._home = home_fds
        # Any hierarchy lists the same processes; the freezer's is the one frozen.  Opened
        # for each read: v1 serves a ``cgroup.procs`` still open from a pid list it
        # keeps for a second after the last read (cgroup_pidlist_start), stale.
        self._procs = os.path.join(dirs.get("freezer", unique[0]), "cgroup.procs")
        # Held open (``_keep``): the counters read at every job's end, reset on recycle.
        self._cpu = self._peak = self._io = self._io_reset = -1
        if "cpuacct" in dirs:
            self._cpu = _keep(os.path.join(dirs["cpuacct"], "cpuacct.usage"), os.O_RDWR)
        self._peak = self._keep_peak()
        if "blkio" in dirs:
            self._io = _keep(os.path.join(dirs["blkio"], "blkio.throttle.io_service_bytes"))
            self._io_reset = _keep(os.path.join(dirs["blkio"], "blkio.reset_stats"),
                                   os.O_WRONLY)
        # Swap accounting on (a host setting): a memory limit covers swap too.
        self._memsw = "memory" in dirs and os.path.exists(
            os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes"))
        self._extra = extra or {}
        # Joined: controller -> the job's cgroup there (directory, its ``tasks`` and its
        # limit file, both held open).
        self._joined: dict[str, _Extra] = {}
        # Kept from an earlier job that had such a limit, unjoined (see ``recycle``).
        self._spare: dict[str, _Extra] = {}
        self._throttled: set[str] = set()  # devices with a blkio throttle (lifted on recycle)

    def _keep_peak(self) -> int:
        memory = self._dirs.get("memory")
        if memory is None:
            return -1
        return _keep(os.path.join(memory, "memory.max_usage_in_bytes"), os.O_RDWR)

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        d = self._dirs
        if memory is not None:
            _need(d, "memory")
            _write(os.path.join(d["memory"], "memory.limit_in_bytes"), str(memory))
            if self._memsw:  # no escape into swap
                _write(os.path.join(d["memory"], "memory.memsw.limit_in_bytes"), str(memory))
        if pids is not None:
            self._limit("pids", str(pids))
        if cpu is not None:
            # A quota of the period every cgroup starts with (CPU_PERIOD_US), never changed.
            self._limit(CPU_V1, str(max(1000, int(cpu * CPU_PERIOD_US))))

    def _limit(self, controller: str, value: str) -> None:
        joined = self._join(controller)
        if joined is not None:
            _reset(joined.limit, value.encode())
        else:  # co-mounted with one every job has
            _write(os.path.join(self._dirs[controller], _LIMIT_FILE[controller]), value)

    def set_io(self, devices: Sequence[str], read: int | None, write: int | None) -> None:
        if read is None and write is None:
            return
        _need(self._dirs, "blkio")
        for file, value in zip(THROTTLE_V1, (read, write), strict=True):
            if value is not None:
                for device in devices:
                    # One rule per write; ENODEV for a partition or a device that is gone.
                    _write(os.path.join(self._dirs["blkio"], file), f"{device} {value}")
                    self._throttled.add(device)

    def _join(self, controller: str) -> _Extra | None:
        """Give the job a cgroup in an on-demand hierarchy (before it is spawned); None if
        that hierarchy is co-mounted with one every job has."""
        joined = self._joined.get(controller)
        if joined is not None or controller in self._dirs:
            return joined
        if controller not in self._extra:
            raise OSError(errno.ENOTSUP, f"no {controller} controller mounted for this limit")
        joined = self._spare.pop(controller, None) or self._make_extra(controller)
        self._joined[controller] = joined
        self._dirs = {**self._dirs, controller: joined.path}
        return joined

    def _make_extra(self, controller: str) -> _Extra:
        path = os.path.join(self._extra[controller][0], self.name)
        try:
            self._fs[0](path)
        except FileExistsError:
            pass
        tasks = os.open(os.path.join(path, "tasks"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            limit = os.open(os.path.join(path, _LIMIT_FILE[controller]),
                            os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(tasks)
            raise
        return _Extra(path, tasks, limit)

    def _leave_extra(self) -> None:
        """Recycling: the next job may want no such limit, so those cgroups are left, their
        limits lifted, and kept to be renamed with the others: a later job with such a
        limit then joins one without a mkdir and an open on the reactor thread (a workload
        of limited jobs soon has them in every recycled cgroup; others never make them)."""
        for controller, joined in self._joined.items():
            self._dirs.pop(controller)
            _reset(joined.limit, _NO_LIMIT[controller])
            self._spare[controller] = joined
        self._joined = {}

    def oom_notifier(self) -> int | None:
        # cgroup v1's notification API (Documentation/admin-guide/cgroup-v1/memory.rst,
        # "OOM Control"): "<eventfd> <fd of memory.oom_control>" into cgroup.event_control.
        # The kernel keeps its own references; the event goes when the eventfd is closed
        # or the cgroup removed.
        if "memory" not in self._dirs:
            return None
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ofd = os.open(os.path.join(self._dirs["memory"], "memory.oom_control"),
                          os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(os.path.join(self._dirs["memory"], "cgroup.event_control"),
                       f"{efd} {ofd}")
            finally:
                os.close(ofd)
        except OSError:
            os.close(efd)
            return None
        return efd

    def oom_kills(self) -> int:
        if "memory" not in self._dirs:
            return 0
        try:
            text = _read(os.path.join(self._dirs["memory"], "memory.oom_control"))
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":  # Linux 4.13
                return int(value)
        return 0

    def recycle(self, name: str) -> None:
        """Reset the counters and limits a job has, then rename each directory (~0.25 ms
        against ~0.75 ms to remove, make and open them all anew, on this host).  The
        memory cgroup alone is made anew: what the last job left charged there (its log
        files' page cache, mostly) goes to the parent on rmdir, where reclaiming it
        (``memory.force_empty``) would evict pages a client may read next and cost
        writeback; so the next job's peak starts from nothing."""
        self._leave_extra()
        d = self._dirs
        memory = d.get("memory")
        if memory is not None and list(d.values()).count(memory) == 1:
            mkdir, rmdir = self._fs
            fresh = os.path.join(os.path.dirname(memory), name)
            fd = self._task_fd.pop(memory)
            self._tasks.remove(fd)
            _close_all((fd, self._peak))
            self._peak = -1
            rmdir(memory)
            mkdir(fresh)
            fd = os.open(os.path.join(fresh, "tasks"), os.O_WRONLY | os.O_CLOEXEC)
            self._tasks.append(fd)
            self._task_fd[fresh] = fd
            d = self._dirs = {c: fresh if c == "memory" else p for c, p in d.items()}
            self._peak = self._keep_peak()
        elif memory is not None:  # co-mounted with another controller: reclaim in place
            memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # raised first: it may not go below the other
                _write(memsw, "-1")
            _write(os.path.join(memory, "memory.limit_in_bytes"), "-1")
            _write(os.path.join(memory, "memory.force_empty"), "0")
            _reset(self._peak, b"0\n")
        if "pids" in d:  # co-mounted with one every job has
            _write(os.path.join(d["pids"], "pids.max"), "max")
        if CPU_V1 in d:  # co-mounted with cpuacct
            _write(os.path.join(d[CPU_V1], "cpu.cfs_quota_us"), "-1")
        _reset(self._cpu, b"0\n")
        if "blkio" in d:
            for device in self._throttled:
                for file in THROTTLE_V1:
                    _write(os.path.join(d["blkio"], file), f"{device} 0")
            self._throttled = set()
            _reset(self._io_reset, b"1")
        renamed: dict[str, str] = {}
        for old in dict.fromkeys(d.values()):
            new = os.path.join(os.path.dirname(old), name)
            if old != new:
                # Within one parent (kernel/cgroup/cgroup-v1.c).  A failure part way
                # leaves both names: the pool then removes both.
                os.rename(old, new)
            renamed[old] = new
        for spare in self._spare.values():
            new = os.path.join(os.path.dirname(spare.path), name)
            os.rename(spare.path, new)
            spare.path = new
        self._dirs = {c: renamed[p] for c, p in d.items()}
        self._task_fd = {renamed[p]: fd for p, fd in self._task_fd.items()}
        unique = list(dict.fromkeys(self._dirs.values()))
        self._procs = os.path.join(self._dirs.get("freezer", unique[0]), "cgroup.procs")
        self.name = name

    def enter(self) -> None:
        tid = _THIS_THREAD
        for fd in self._tasks:
            os.write(fd, tid)
        for joined in self._joined.values():
            os.write(joined.tasks, tid)

    def leave(self) -> None:
        tid = _THIS_THREAD
        error: OSError | None = None
        home = self._home
        if self._joined:
            home = [*home, *(self._extra[c][1] for c in self._joined)]
        for fd in home:
            try:
                os.write(fd, tid)
            except OSError as e:  # try every hierarchy, then say what went wrong
                error = error or e
        if error is not None:
            raise error

    def pids(self) -> list[int]:
        try:
            fd = os.open(self._procs, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []  # removed
        try:
            return _pids_in(fd)
        finally:
            os.close(fd)

    def freeze(self) -> bool:
        if "freezer" not in self._dirs:
            return False
        _write(os.path.join(self._dirs["freezer"], "freezer.state"), "FROZEN")
        return True

    def frozen(self) -> bool:
        # FREEZING until every task is frozen (one in an uninterruptible sleep can hold
        # it there); FROZEN then.  (Documentation/admin-guide/cgroup-v1/freezer-subsystem)
        try:
            return _read(os.path.join(self._dirs["freezer"], "freezer.state")).strip() == "FROZEN"
        except (KeyError, FileNotFoundError):
            return True

    def thaw(self) -> None:
        if "freezer" in self._dirs:
            try:
                _write(os.path.join(self._dirs["freezer"], "freezer.state"), "THAWED")
            except FileNotFoundError:
                pass

    def kill_all(self, kill: Kill) -> int:
        return _kill_each(self.pids(), kill)

    def usage(self) -> dict[str, Any]:
        cpu_ns = _pread_int(self._cpu)
        peak = _pread_int(self._peak)
        read = write = None
        if self._io >= 0:
            # "MAJ:MIN Read N" lines per device, then "Total N".  Counts reads and direct
            # (O_DIRECT) writes; buffered writes are written back by the kernel's flusher
            # threads and charged to no job in v1.
            try:
                text = _pread_all(self._io)
            except OSError:
                text = b""
            read = write = 0
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] == b"Read":
                    read += int(parts[2])
                elif len(parts) == 3 and parts[1] == b"Write":
                    write += int(parts[2])
        return {"cpu_seconds": cpu_ns / 1e9 if cpu_ns is not None else None,
                "memory_peak": peak, "io_read_bytes": read, "io_write_bytes": write}

    def close(self) -> None:
        _close_all((*self._tasks, self._cpu, self._peak, self._io, self._io_reset))
        self._tasks = []
        self._cpu = self._peak = self._io = self._io_reset = -1
        for extra in (*self._joined.values(), *self._spare.values()):
            _close_all((extra.tasks, extra.limit))
        self._joined, self._spare = {}, {}


class V1Driver:
    """cgroup v1: a directory per job in each controller's hierarchy."""

    version = "v1"
    atomic_kill = False

    def __init__(self, own: dict[str, str], root_name: str, mkdir: Mkdir = os.mkdir,
                 rmdir: Rmdir = os.rmdir) -> None:
        """``own``: controller -> the daemon's own cgroup directory in its hierarchy."""
        self._mkdir = mkdir
        self._rmdir = rmdir
        self.controllers = tuple(c for c in CONTROLLERS_V1 if c in own)
        self._subtree = {c: os.path.join(own[c], root_name) for c in self.controllers}
        self._made = tuple(dict.fromkeys(self._subtree.values()))  # every job has these
        self._own_dirs = list(dict.fromkeys(own[c] for c in self.controllers))
        # On-demand hierarchies apart from those: controller -> (subtree, own cgroup).
        self._extra: dict[str, tuple[str, str]] = {}
        for c in ON_DEMAND_V1:
            if c in own:
                root = os.path.join(own[c], root_name)
                if root in self._made:  # co-mounted (cpu,cpuacct): every job has it
                    self._subtree[c] = root
                else:
                    self._extra[c] = (root, own[c])
        self.roots = self._made + tuple(r for r, _ in self._extra.values())
        self._home: list[int] = []
        self._extra_home: dict[str, int] = {}

    def setup(self) -> None:
        for root in self.roots:
            if not os.path.isdir(root):
                self._mkdir(root)
        if not self._home:
            self._home = _open_tasks(self._own_dirs, "tasks")
        for c, (_, own_dir) in self._extra.items():
            if c not in self._extra_home:
                self._extra_home[c] = _open_tasks([own_dir], "tasks")[0]

    def paths(self, name: str) -> list[str]:
        return [os.path.join(root, name) for root in self.roots]

    def create(self, name: str) -> None:
        for path in (os.path.join(root, name) for root in self._made):
            try:
                self._mkdir(path)
            except FileExistsError:
                pass

    def remove(self, name: str) -> None:
        _rmdir_all(self.paths(name), self._rmdir)

    def children(self) -> list[str]:
        names: set[str] = set()
        for root in self.roots:
            try:
                names.update(e.name for e in os.scandir(root) if e.is_dir())
            except FileNotFoundError:
                pass
        return sorted(names)

    def open(self, name: str) -> CgroupFiles:
        extra = {c: (root, self._extra_home[c]) for c, (root, _) in self._extra.items()}
        return V1Files(name, {c: os.path.join(s, name) for c, s in self._subtree.items()},
                       self._home, extra, (self._mkdir, self._rmdir))

    def teardown(self) -> None:
        for fd in self._home:
            os.close(fd)
        self._home = []
        for fd in self._extra_home.values():
            os.close(fd)
        self._extra_home = {}
        try:
            _rmdir_all(list(self.roots), self._rmdir)
        except OSError:
            pass  # something is left (a job still running): keep the subtree


# -- v2 --------------------------------------------------------------------------------------


class V2Files:
    """A job's v2 cgroup.  v2 moves whole processes (``cgroup.procs``), not threads: until
    spawning can pass the cgroup to clone3 (CLONE_INTO_CGROUP; glibc 2.39's
    ``posix_spawnattr_setcgroup_np``), ``enter`` moves the daemon itself in for the spawn
    and ``leave`` moves it back."""

    def __init__(self, name: str, dir: str, home_fd: int) -> None:
        self.name = name
        self._dir = dir
        self._procs = os.open(os.path.join(dir, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            self._listed = os.open(os.path.join(dir, "cgroup.procs"),
                                   os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._procs)
            raise
        # Held open (``_keep``), read at the job's end; -1 where the controller is not
        # delegated (memory.peak: Linux 5.19).
        self._cpu = _keep(os.path.join(dir, "cpu.stat"))
        self._peak = _keep(os.path.join(dir, "memory.peak"))
        self._io = _keep(os.path.join(dir, "io.stat"))
        self._home = home_fd

    def enter(self) -> None:
        os.write(self._procs, str(os.getpid()).encode())

    def leave(self) -> None:
        os.write(self._home, str(os.getpid()).encode())

    def pids(self) -> list[int]:
        return _pids_in(self._listed)

    def freeze(self) -> bool:
        return False  # cgroup.kill needs no freezing

    def frozen(self) -> bool:
        return True

    def thaw(self) -> None:
        pass

    def kill_all(self, kill: Kill) -> int:
        try:
            _write(os.path.join(self._dir, "cgroup.kill"), "1")  # Linux 5.14
        except FileNotFoundError:
            return _kill_each(self.pids(), kill)
        return -1

    def usage(self) -> dict[str, Any]:
        cpu_us = None
        try:
            for line in _pread_all(self._cpu).splitlines() if self._cpu >= 0 else ():
                key, _, value = line.partition(b" ")
                if key == b"usage_usec":
                    cpu_us = int(value)
        except (OSError, ValueError):
            pass
        peak = _pread_int(self._peak)
        read = write = None
        try:
            text = _pread_all(self._io) if self._io >= 0 else None
        except OSError:
            text = None
        if text is not None:
            read = write = 0
            for line in text.splitlines():
                for item in line.split()[1:]:
                    key, _, value = item.partition(b"=")
                    if key == b"rbytes":
                        read += int(value)
                    elif key == b"wbytes":
                        write += int(value)
        return {"cpu_seconds": cpu_us / 1e6 if cpu_us is not None else None,
                "memory_peak": peak, "io_read_bytes": read, "io_write_bytes": write}

    def recycle(self, name: str) -> None:
        raise OSError(errno.EPERM, "cgroup v2 cannot rename a cgroup")

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        if memory is not None:
            _write(os.path.join(self._dir, "memory.max"), str(memory))
            swap = os.path.join(self._dir, "memory.swap.max")
            if os.path.exists(swap):
                _write(swap, "0")
        if cpu is not None:
            quota = max(1000, int(cpu * CPU_PERIOD_US))
            _write(os.path.join(self._dir, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
        if pids is not None:
            _write(os.path.join(self._dir, "pids.max"), str(pids))

    def set_io(self, devices: Sequence[str], read: int | None, write: int | None) -> None:
        if read is None and write is None:
            return
        if not os.path.exists(os.path.join(self._dir, "io.max")):
            raise OSError(errno.ENOTSUP, "no io controller delegated for this limit")
        rbps = "max" if read is None else str(read)
        wbps = "max" if write is None else str(write)
        for device in devices:
            _write(os.path.join(self._dir, "io.max"), f"{device} rbps={rbps} wbps={wbps}")

    def oom_kills(self) -> int:
        try:
            text = _read(os.path.join(self._dir, "memory.events"))
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def oom_notifier(self) -> int | None:
        # "A value change in this file generates a file modified event" (cgroup-v2.rst).
        try:
            return _inotify(os.path.join(self._dir, "memory.events"))
        except OSError:
            return None

    def close(self) -> None:
        _close_all((self._procs, self._listed, self._cpu, self._peak, self._io))
        self._procs = self._listed = self._cpu = self._peak = self._io = -1


class V2Driver:
    """cgroup v2: one directory per job under ``<own>/<root_name>``."""

    version = "v2"
    atomic_kill = True

    def __init__(self, own: str, root_name: str, mkdir: Mkdir = os.mkdir,
                 rmdir: Rmdir = os.rmdir) -> None:
        self._mkdir = mkdir
        self._rmdir = rmdir
        self._own = own
        self._root = os.path.join(own, root_name)
        self.roots: tuple[str, ...] = (self._root,)
        try:
            offered = _read(os.path.join(own, "cgroup.controllers")).split()
        except OSError:
            offered = []
        self.controllers = tuple(c for c in CONTROLLERS_V2 if c in offered)
        self._home = -1

    def setup(self) -> None:
        if not os.path.isdir(self._root):
            self._mkdir(self._root)
        if self.controllers:
            # Delegated to us (systemd Delegate=yes): enable them for the subtree and its
            # children.  The daemon's own cgroup must then hold no process but the daemon's
            # (the "no internal processes" rule), which a service's cgroup satisfies.
            enable = " ".join(f"+{c}" for c in self.controllers)
            try:
                for d in (self._own, self._root):
                    _write(os.path.join(d, "cgroup.subtree_control"), enable)
            except OSError:
                # EBUSY: other processes share our cgroup.  Jobs still get cgroups (for
                # stop and cpu time) without the controllers.
                self.controllers = ()
        if self._home < 0:
            self._home = os.open(os.path.join(self._own, "cgroup.procs"),
                                 os.O_WRONLY | os.O_CLOEXEC)

    def paths(self, name: str) -> list[str]:
        return [os.path.join(self._root, name)]

    def create(self, name: str) -> None:
        try:
            self._mkdir(os.path.join(self._root, name))
        except FileExistsError:
            pass

    def remove(self, name: str) -> None:
        _rmdir_all(self.paths(name), self._rmdir)

    def children(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._root) if e.is_dir())
        except FileNotFoundError:
            return []

    def open(self, name: str) -> CgroupFiles:
        return V2Files(name, os.path.join(self._root, name), self._home)

    def teardown(self) -> None:
        if self._home >= 0:
            os.close(self._home)
            self._home = -1
        try:
            self._rmdir(self._root)
        except OSError:
            pass


# -- detection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    """What start-up found: a driver, or None and why not."""

    driver: CgroupDriver | None
    reason: str


def detect(root_name: str, *, mountinfo: str = "/proc/self/mountinfo",
           own: str = "/proc/thread-self/cgroup", prefix: str = "",
           mkdir: Mkdir = os.mkdir, rmdir: Rmdir = os.rmdir) -> Detected:
    """Find the cgroups the calling thread is in and pick a driver: v2 when the daemon's v2
    cgroup offers the memory controller (a pure v2 host), else v1 with whichever of
    CONTROLLERS_V1 are mounted, else a controller-less v2 (membership and cgroup.kill),
    else none.  ``prefix`` is prepended to mount points (a fake tree in tests)."""
    try:
        mounts = _read(mountinfo).splitlines()
        memberships = _read(own).splitlines()
    except OSError as e:
        return Detected(None, f"cannot read {e.filename}: {e.strerror}")
    v1_paths: dict[str, str] = {}
    v2_path: str | None = None
    for line in memberships:
        hid, ctl, path = line.split(":", 2)
        if hid == "0" and ctl == "":
            v2_path = path
        for c in ctl.split(","):
            if c:
                v1_paths[c] = path
    v1_own: dict[str, str] = {}
    v2_own: str | None = None
    for line in mounts:
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        root, point, fstype = fields[3], _unescape(fields[4]), fields[sep + 1]
        options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup":
            for c in (*CONTROLLERS_V1, *ON_DEMAND_V1):
                if c in options and c in v1_paths and c not in v1_own:
                    rel = _relative(v1_paths[c], root)
                    if rel is not None:
                        v1_own[c] = prefix + point + rel
        elif fstype == "cgroup2" and v2_path is not None and v2_own is None:
            rel = _relative(v2_path, root)
            if rel is not None:
                v2_own = prefix + point + rel
    v1_own = {c: d for c, d in v1_own.items() if os.path.isdir(d)}
    if v2_own is not None and not os.path.isdir(v2_own):
        v2_own = None
    v2 = V2Driver(v2_own, root_name, mkdir, rmdir) if v2_own is not None else None
    if v2 is not None and "memory" in v2.controllers:
        return Detected(v2, f"cgroup v2 at {v2_own}")
    if v1_own:
        return Detected(V1Driver(v1_own, root_name, mkdir, rmdir), "cgroup v1")
    if v2 is not None:
        return Detected(v2, f"cgroup v2 at {v2_own}, no controllers delegated")
    return Detected(None, "no cgroup hierarchy mounted for this process")


def _relative(path: str, mount_root: str) -> str | None:
    """``path`` (from /proc/.../cgroup) below the mount's root, or None if outside it."""
    if mount_root == "/":
        return "" if path == "/" else path
    if path == mount_root:
        return ""
    if path.startswith(mount_root + "/"):
        return path[len(mount_root):]
    return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace(
        "\\012", "\n").replace("\\134", "\\")


__all__ = ["CONTROLLERS_V1", "CONTROLLERS_V2", "CPU_V1", "ON_DEMAND_V1", "CgroupDriver", "CgroupFiles", "Detected",
           "Kill", "Mkdir", "Rmdir", "THROTTLE_V1", "V1Driver", "V1Files", "V2Driver", "V2Files", "detect"]
