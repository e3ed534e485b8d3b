"""A process's identity beyond its pid: its start time, from ``/proc/<pid>/stat``.

A pid is reused once its process is reaped; the pair (pid, start time in clock ticks since
boot) names one process for the machine's uptime.  A restarted daemon signals a job it
adopts only when both still match.
"""

from __future__ import annotations

import os
import time

_HZ = os.sysconf("SC_CLK_TCK")


def start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks after boot), or None if no such
    process is visible."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')': fields
    # are counted after the last ')'.  Field 3 is the first after it; 22 is the 20th.
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
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
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    try:
        fields = data[data.rindex(b")") + 2:].split()
        return fields[0] not in (b"Z", b"X") and earliest <= int(fields[19]) <= latest
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
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            if int(fields[3]) != pid or fields[0] in (b"Z", b"X"):  # not a session leader
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if environ.startswith(needle) or b"\0" + needle in environ:
            return pid, int(fields[19])
    return None
