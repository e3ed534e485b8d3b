"""A process's identity beyond its pid: its start time, from ``/proc/<pid>/stat``.

A pid is reused once its process is reaped; the pair (pid, start time in clock ticks since
boot) names one process for the machine's uptime.  A restarted daemon signals a job it
adopts only when both still match.
"""

from __future__ import annotations

import os
import time

_HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` from field 3 (the state) on, or None.  The
    command name (field 2) is in parentheses and may hold spaces or ')': fields are
    counted after the last ')', so field N is at index N - 3."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot), or None if no such
    process is visible."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (ValueError, IndexError):
        return None


def ticks_now() -> int:
    """Now, in the clock ticks ``/proc/<pid>/stat`` counts start times in.  Taken just
    before and just after a spawn, two of these bound the child's start time, without
    reading ``/proc`` on the hot path (~17 us a read)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _HZ)


def is_running(pid: int, earliest: int | None, latest: int | None) -> bool:
    """Whether ``pid`` is still the process that started between ``earliest`` and
    ``latest`` (clock ticks), and not a zombie: a job that exited and waits for its new
    parent to reap it has ended."""
    if earliest is None or latest is None:
        return False
    fields = _stat(pid)
    try:
        return (fields is not None and fields[0] not in (b"Z", b"X")
                and earliest <= int(fields[19]) <= latest)
    except (ValueError, IndexError):
        return False


def find_job_leader(env_entry: bytes) -> tuple[int, int] | None:
    """(pid, start time) of the session leader whose environment holds ``env_entry``
    (``JOBWORKER_JOB_ID=<id>``): how a restarted daemon finds a job it spawned but had
    not yet recorded the pid of.  Walks every process: for start-up only."""
    needle = env_entry + b"\0"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        fields = _stat(pid)
        try:
            if fields is None or int(fields[3]) != pid or fields[0] in (b"Z", b"X"):
                continue  # gone, a zombie, or not a session leader
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if environ.startswith(needle) or b"\0" + needle in environ:
            return pid, int(fields[19])
    return None
