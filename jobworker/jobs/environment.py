"""The environment a job starts with: a documented base, the request's overlay, its id."""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_ID_VAR = "JOBWORKER_JOB_ID"


def daemon_base_env() -> dict[str, str]:
    """The documented environment every job starts from (before the request's overlay);
    nothing of the daemon's own environment leaks into it."""
    try:
        entry = pwd.getpwuid(os.geteuid())
        home, user = entry.pw_dir, entry.pw_name
    except KeyError:
        home, user = "/", str(os.geteuid())
    return {"PATH": DEFAULT_PATH, "HOME": home, "USER": user, "LOGNAME": user}


def parse_env(entries: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` to a dict, later entries winning; raises ValueError with a message
    naming the bad entry."""
    result: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"bad environment entry {entry!r}: expected a KEY=VALUE string")
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"bad environment entry {entry!r}: expected KEY=VALUE")
        if "\0" in entry:
            raise ValueError(f"bad environment entry {entry!r}: contains a NUL byte")
        result[key] = value
    return result


def job_environment(base: dict[str, str], job_id: str, overlay: Sequence[str]) -> dict[str, str]:
    """``base``, then the request's ``KEY=VALUE`` entries, then the job's id, set last so a
    job can always trust it.  Raises ValueError or TypeError naming a bad entry."""
    environment = dict(base)
    environment.update(parse_env(overlay))
    environment[JOB_ID_VAR] = job_id
    return environment
