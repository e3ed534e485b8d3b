"""Fakes and helpers for jobworker's own tests and for anyone testing code built on it.

``ProcessReactor`` is a ``MemoryReactorClock`` whose ``spawnProcess`` records the call and
returns a ``FakeProcess`` the test ends at will; its ``killpg`` records group signals, so a
JobManager built with ``killpg=reactor.killpg`` never touches real processes.
``create_logs`` makes a job's log directory as a start would; ``read_range`` and ``size``
read a log file back.  ``FakeCgroups`` hands out job cgroups over ``FakeCgroupFiles`` (in
memory); ``FakeCgroupTree`` lays out a v1 or v2 cgroup file system in a directory for the
real drivers of ``jobworker.jobs.cgroups``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import msgpack
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.jobs.cgroups import CONTROLLERS_V1, ON_DEMAND_V1, Detected, detect
from jobworker.jobs.jobcgroup import JobCgroup
from jobworker.jobs.logs import JobLogs, LogStore
from jobworker.wire.frames import PREFIX


@implementer(IProcessTransport)
class FakeProcess:
    """A spawned process that ends only when the test calls ``exit`` or ``kill``."""

    def __init__(
        self,
        reactor: ProcessReactor,
        pid: int,
        proto: IProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str],
        path: str | None,
        child_fds: dict[int, Any] | None,
    ) -> None:
        self.reactor = reactor
        self.pid: int | None = pid
        self.original_pid = pid
        self.proto: ProcessProtocol | None = cast(ProcessProtocol, proto)
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        self.child_fds = child_fds
        self.signals: list[int | str] = []  # via signalProcess (JobManager uses killpg)

    @property
    def ended(self) -> bool:
        return self.proto is None

    def exit(self, code: int = 0) -> None:
        """End as if the process called exit(code)."""
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code, status=code << 8)
        self._end(reason)

    def kill(self, signum: int) -> None:
        """End as if the process was killed by ``signum``."""
        self._end(ProcessTerminated(signal=signum, status=signum))

    def _end(self, reason: BaseException) -> None:
        if self.proto is None:
            raise AssertionError(f"fake process {self.original_pid} has already ended")
        proto, self.proto = self.proto, None
        self.pid = None
        proto.processEnded(Failure(reason))

    # IProcessTransport
    def signalProcess(self, signalID: int | str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def closeStdin(self) -> None: ...
    def closeStdout(self) -> None: ...
    def closeStderr(self) -> None: ...
    def closeChildFD(self, descriptor: int) -> None: ...
    def writeToChild(self, childFD: int, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Iterable[bytes]) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...


@dataclass
class _Group:
    leader: FakeProcess
    lingering: bool = False  # members left after the leader ended


class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock that can spawn fake processes and signal their groups.

    ``spawn_error``, when set, is raised by the next ``spawnProcess`` (then cleared).
    ``next_pid`` is the pid the next process gets; set it to simulate pid reuse.
    ``signals`` lists every ``killpg(pgid, sig)`` with sig != 0 (0 is only a probe).
    """

    @classmethod
    def at(cls, when: float) -> ProcessReactor:
        """A fake reactor whose clock already reads ``when`` (a real-looking instant, so
        timestamps in records are plausible)."""
        reactor = cls()
        reactor.advance(when)
        return reactor

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.spawn_error: BaseException | None = None
        self.next_pid = 1000
        self.signals: list[tuple[int, int]] = []
        self._groups: dict[int, _Group] = {}

    def spawnProcess(  # type: ignore[override]
        self,
        processProtocol: IProcessProtocol,
        executable: str,
        args: list[str] = [],  # noqa: B006 (mirrors the interface)
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, Any] | None = None,
    ) -> FakeProcess:
        if self.spawn_error is not None:
            error, self.spawn_error = self.spawn_error, None
            raise error
        pid = self.next_pid
        self.next_pid += 1
        process = FakeProcess(
            self, pid, processProtocol, executable, list(args), dict(env or {}), path, childFDs
        )
        self.processes.append(process)
        self._groups[pid] = _Group(process)
        cast(ProcessProtocol, processProtocol).makeConnection(process)
        return process

    def process(self, pid: int) -> FakeProcess:
        """The newest fake process that was given ``pid``."""
        for process in reversed(self.processes):
            if process.original_pid == pid:
                return process
        raise KeyError(pid)

    def set_lingering(self, pgid: int, lingering: bool = True) -> None:
        """Pretend members of group ``pgid`` outlive (or no longer outlive) its leader."""
        self._groups[pgid].lingering = lingering

    def killpg(self, pgid: int, signum: int) -> None:
        """Like os.killpg: ProcessLookupError when no member of the group is left."""
        group = self._groups.get(pgid)
        if group is None or (group.leader.ended and not group.lingering):
            raise ProcessLookupError(3, "No such process")
        if signum != 0:
            self.signals.append((pgid, signum))

    def signals_to(self, pgid: int) -> list[int]:
        """The signal numbers sent to group ``pgid`` so far, in order."""
        return [s for g, s in self.signals if g == pgid]


# -- log files -------------------------------------------------------------------------------

_MAX_READ = 1 << 20  # one pread at a time


def create_logs(store: LogStore, job_id: str, started: float) -> JobLogs:
    """Make a job's log directory and its two empty files, as a start does."""
    logs, out, err = create_open_logs(store, job_id, started)
    os.close(out)
    os.close(err)
    return logs


def create_open_logs(store: LogStore, job_id: str, started: float) -> tuple[JobLogs, int, int]:
    """``create_logs``, returning the two files open for appending as a start holds them."""
    logs = JobLogs(store.dir_for(job_id, started))
    out, err = store.create_at(logs.dir)
    return logs, out, err


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


# -- a connection's far end --------------------------------------------------------------------


class SlowPeer(StringTransport):
    """The daemon's side of a TLS connection to a peer that reads only when told to.

    It presents ``cert`` as the peer's certificate, pauses its streaming producer once more
    than ``limit`` bytes are unread, as a TCP transport does, and like
    TLSMemoryBIOProtocol's producer membrane it passes on only the first pause until the
    peer has read (``drain``, which returns the frames read, decoded)."""

    def __init__(self, cert: Any, limit: int = 64 * 1024) -> None:
        super().__init__()
        self.cert = cert
        self.limit = limit
        self.unread = 0
        self.peak = 0
        self.producer_paused = False

    def getPeerCertificate(self) -> Any:
        return self.cert

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        self.peak = max(self.peak, self.unread)
        if self.producer is not None and self.unread > self.limit and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def drain(self) -> list[Any]:
        """The peer reads everything sent so far; then the producer is resumed."""
        frames = frames_in(self.value())
        self.clear()
        self.unread = 0
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return frames


def frames_in(data: bytes) -> list[Any]:
    """Every frame in ``data``, decoded as a peer would; the data must end on a frame."""
    out, offset = [], 0
    while len(data) - offset >= 4:
        (length,) = PREFIX.unpack_from(data, offset)
        out.append(msgpack.unpackb(data[offset + 4:offset + 4 + length], raw=False))
        offset += 4 + length
    if offset != len(data):
        raise AssertionError("the server wrote a partial frame")
    return out


# -- cgroups ----------------------------------------------------------------------------------


class FakeCgroupFiles:
    """A job cgroup in memory: ``procs`` is what the kernel would list; ``log`` records
    enter/leave/freeze/kill/thaw in order; ``freezing`` keeps it FREEZING (a stuck task)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[int] = []
        self.log: list[str] = []
        self.state = "THAWED"
        self.freezing = False
        self.can_freeze = True
        self.counted: dict[str, Any] = {"cpu_seconds": 0.0, "memory_peak": 0,
                                        "io_read_bytes": 0, "io_write_bytes": 0}
        self.usage_reads = 0
        self.closed = False
        self.inside = False
        self.limits: tuple[int | None, float | None, int | None] | None = None
        self.ooms = 0  # processes the kernel's OOM killer ended here
        self.oom_fd: int | None = None
        self.io: tuple[list[str], int | None, int | None] | None = None

    def enter(self) -> None:
        self.log.append("enter")
        self.inside = True

    def leave(self) -> None:
        self.log.append("leave")
        self.inside = False

    def pids(self) -> list[int]:
        return list(self.procs)

    def freeze(self) -> bool:
        if not self.can_freeze:
            return False
        self.log.append("freeze")
        self.state = "FREEZING" if self.freezing else "FROZEN"
        return True

    def frozen(self) -> bool:
        return self.state == "FROZEN"

    def thaw(self) -> None:
        self.log.append("thaw")
        self.state = "THAWED"

    def kill_all(self, kill: Any) -> int:
        self.log.append(f"kill:{self.state}")
        for pid in self.procs:
            kill(pid, 9)
        return len(self.procs)

    def usage(self) -> dict[str, Any]:
        self.usage_reads += 1
        return dict(self.counted)

    def recycle(self, name: str) -> None:
        self.log.append("recycle")
        self.name = name

    def set_limits(self, memory: int | None, cpu: float | None, pids: int | None) -> None:
        self.log.append(f"limits:{memory},{cpu},{pids}")
        self.limits = (memory, cpu, pids)

    def set_io(self, devices: Any, read: int | None, write: int | None) -> None:
        self.log.append(f"io:{','.join(devices)},{read},{write}")
        self.io = (list(devices), read, write)

    def oom_kills(self) -> int:
        return self.ooms

    def oom_notifier(self) -> int | None:
        """``oom_fd`` if a test set one (an eventfd it signals), else None (polling)."""
        return self.oom_fd

    def close(self) -> None:
        self.closed = True


class FakeCgroups:
    """``JobManager(cgroups=...)``: each job gets a JobCgroup over FakeCgroupFiles
    (``files[job_id]``); ``kills`` lists (pid, signal) sent to its processes;
    ``released`` the cgroups handed back; ``error``, when set, is raised by the next take."""

    def __init__(self, reactor: Any, atomic_kill: bool = False) -> None:
        self.reactor = reactor
        self.atomic_kill = atomic_kill
        self.files: dict[str, FakeCgroupFiles] = {}
        self.kills: list[tuple[int, int]] = []
        self.released: list[str] = []
        self.error: OSError | None = None
        self.unused_ids: list[str] = []

    def new_id(self) -> None:
        return None  # no cgroup made ahead: take makes each

    def prepare(self, job_id: str) -> Deferred[None]:
        return succeed(None)  # take makes it

    def adopt(self, job_id: str) -> JobCgroup | None:
        return None  # no earlier daemon's cgroups here

    def unused(self, job_id: str) -> None:
        self.unused_ids.append(job_id)

    def take(self, job_id: str) -> JobCgroup:
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        files = self.files[job_id] = FakeCgroupFiles(job_id)
        return JobCgroup(self.reactor, files, atomic_kill=self.atomic_kill,
                         on_release=self._release, kill=self._kill)

    def _release(self, files: Any) -> None:
        """As the pool does, but at once: the files closed."""
        self.released.append(files.name)
        files.close()

    def _kill(self, pid: int, signum: int) -> None:
        self.kills.append((pid, signum))


#: What a fresh cgroup directory holds, per v1 controller (the files the drivers use).
_V1_FILES = {
    "memory": {"memory.max_usage_in_bytes": "0\n", "memory.force_empty": "",
               "memory.limit_in_bytes": "9223372036854771712\n",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max\n"},
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "blkio": {"blkio.throttle.io_service_bytes": "Total 0\n", "blkio.reset_stats": "",
              "blkio.throttle.read_bps_device": "", "blkio.throttle.write_bps_device": ""},
    "freezer": {"freezer.state": "THAWED\n"},
}
_V2_FILES = {"cgroup.procs": "", "cgroup.kill": "", "cgroup.subtree_control": "",
             "cgroup.controllers": "", "cpu.stat": "usage_usec 0\n", "memory.peak": "0\n",
             "io.stat": "", "memory.max": "max\n", "cpu.max": "max 100000\n",
             "pids.max": "max\n", "memory.events": "oom 0\noom_kill 0\n", "io.max": ""}


class FakeCgroupTree:
    """A cgroup file system in ``root`` for the real drivers: ``/proc/self/mountinfo``
    and ``/proc/thread-self/cgroup`` files, mount points under ``root/sys/fs/cgroup``, and
    a ``mkdir`` that writes the files the kernel would.  v1: every CONTROLLERS_V1 mounted
    alone, the daemon in ``/`` except memory (``/outer/daemon``); v2: one unified mount,
    the daemon in ``/svc``, offering ``controllers``."""

    def __init__(self, root: str, version: str, controllers: str = "memory cpu io pids"
                 ) -> None:
        self.root = root
        self.version = version
        self.mountinfo = os.path.join(root, "mountinfo")
        self.own_file = os.path.join(root, "cgroup")
        mounts, members = [], []
        if version == "v1":
            for i, c in enumerate((*CONTROLLERS_V1, *ON_DEMAND_V1)):
                mounts.append(f"{40 + i} 31 0:{40 + i} / /sys/fs/cgroup/{c} rw - cgroup "
                              f"cgroup rw,{c}")
                own = "/outer/daemon" if c == "memory" else "/"
                members.append(f"{i + 1}:{c}:{own}")
                self._populate(os.path.join(root, f"sys/fs/cgroup/{c}") + own, c)
            members.append("0::/")
        else:
            mounts.append("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw")
            members.append("0::/svc")
            self._populate(os.path.join(root, "sys/fs/cgroup/svc"), "")
            with open(os.path.join(root, "sys/fs/cgroup/svc/cgroup.controllers"), "w") as f:
                f.write(controllers + "\n")
        with open(self.mountinfo, "w") as f:
            f.write("\n".join(mounts) + "\n")
        with open(self.own_file, "w") as f:
            f.write("\n".join(members) + "\n")

    def detect(self, root_name: str) -> Detected:
        return detect(root_name, mountinfo=self.mountinfo, own=self.own_file,
                      prefix=self.root, mkdir=self.mkdir, rmdir=self.rmdir)

    def rmdir(self, path: str) -> None:
        """os.rmdir of a cgroup: EBUSY while its cgroup.procs lists a pid, as the kernel
        says; the kernel's files go with it.  (The daemon's own cgroups are never removed.)"""
        import errno

        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        subdirs = [e for e in os.scandir(path) if e.is_dir()]
        if subdirs:
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        procs = os.path.join(path, "cgroup.procs")
        if os.path.exists(procs) and open(procs).read().split():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for entry in os.scandir(path):
            os.unlink(entry.path)
        os.rmdir(path)

    def mkdir(self, path: str) -> None:
        """os.mkdir, then the files the kernel puts in a new cgroup of that hierarchy."""
        os.mkdir(path)
        if self.version == "v1":
            controller = os.path.relpath(path, os.path.join(self.root, "sys/fs/cgroup"))
            self._files(path, controller.split(os.sep)[0])
        else:
            self._files(path, "")

    def _populate(self, path: str, controller: str) -> None:
        os.makedirs(path, exist_ok=True)
        self._files(path, controller)

    def _files(self, path: str, controller: str) -> None:
        files = (dict({"tasks": "", "cgroup.procs": ""}, **_V1_FILES.get(controller, {}))
                 if self.version == "v1" else _V2_FILES)
        for name, text in files.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)


__all__ = ["FakeCgroupFiles", "FakeCgroupTree", "FakeCgroups", "FakeProcess", "ProcessReactor", "SlowPeer", "create_logs", "create_open_logs",
           "frames_in", "read_range", "size"]
