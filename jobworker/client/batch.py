"""``jwclient submit``: a batch of jobs from a TOML file, started over one connection.

The file is an array of ``[[job]]`` tables: ``command`` and optional ``args`` (list),
``env`` (table), ``dir``, ``name``, ``timeout`` (seconds), ``user``, ``isolate`` (list of
namespaces) and the limits ``memory``, ``cpu``, ``pids``, ``io_read``, ``io_write`` (as
``jwclient start``'s options: sizes as ``512M`` or bytes).
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass, field
from typing import IO, Any

from jobworker.client import render
from jobworker.client.sync import Client, start_params
from jobworker.wire.errors import JobWorkerError
from jobworker.wire.record import FAILED, ISOLATE, JobRecord
from jobworker.wire.sizes import parse_size

MAX_JOBS = 10000
#: Seconds between redraws of the progress lines on a terminal.
TICK = 0.25


class BatchError(Exception):
    """The batch file is unreadable or malformed; the message says where."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    command: str
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    dir: str | None = None
    timeout: float | None = None
    user: str | None = None
    isolate: list[str] = field(default_factory=list)
    #: The limits asked for, as ``Client.start`` takes them (memory=..., io_read=...).
    limits: dict[str, Any] = field(default_factory=dict)


def load(path: str) -> list[JobSpec]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise BatchError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BatchError(f"{path} is not valid TOML: {e}") from None
    jobs = data.get("job")
    if set(data) - {"job"}:
        raise BatchError(f"{path}: only [[job]] tables are allowed at the top level")
    if not isinstance(jobs, list) or not jobs:
        raise BatchError(f"{path}: no [[job]] tables")
    if len(jobs) > MAX_JOBS:
        raise BatchError(f"{path}: more than {MAX_JOBS} jobs")
    return [_spec(path, i, job) for i, job in enumerate(jobs, 1)]


def _spec(path: str, index: int, job: Any) -> JobSpec:
    where = f"{path}: job {index}"
    if not isinstance(job, dict):
        raise BatchError(f"{where}: must be a table")
    unknown = set(job) - {"name", "command", "args", "env", "dir", "timeout", "user",
                          "isolate", *LIMITS}
    if unknown:
        raise BatchError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    command = job.get("command")
    if not isinstance(command, str) or not command:
        raise BatchError(f"{where}: 'command' must be a non-empty string")
    args = job.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise BatchError(f"{where}: 'args' must be a list of strings")
    env = job.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise BatchError(f"{where}: 'env' must be a table of strings")
    directory = job.get("dir")
    if directory is not None and not isinstance(directory, str):
        raise BatchError(f"{where}: 'dir' must be a string")
    timeout = job.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or timeout <= 0):
        raise BatchError(f"{where}: 'timeout' must be a positive number of seconds")
    name = job.get("name", f"job{index}")
    if not isinstance(name, str):
        raise BatchError(f"{where}: 'name' must be a string")
    user = job.get("user")
    if user is not None and (not isinstance(user, str) or not user):
        raise BatchError(f"{where}: 'user' must be a non-empty string")
    isolate = job.get("isolate", [])
    if (not isinstance(isolate, list) or not all(n in ISOLATE for n in isolate)
            or len(set(isolate)) != len(isolate)):
        raise BatchError(f"{where}: 'isolate' must be a list of distinct names of "
                         f"{', '.join(ISOLATE)}")
    limits = {key: _limit(where, key, job[key]) for key in LIMITS if key in job}
    return JobSpec(name, command, list(args), [f"{k}={v}" for k, v in env.items()],
                   directory, float(timeout) if timeout is not None else None, user,
                   list(isolate), limits)


#: The limit keys, each with what its value must be.
LIMITS = {"memory": "a size such as 512M or 1G, or a number of bytes",
          "cpu": "a positive number of cores (0.5)",
          "pids": "a whole number of processes, at least 2",
          "io_read": "bytes per second: a size such as 10M, or a number",
          "io_write": "bytes per second: a size such as 10M, or a number"}


def _limit(where: str, key: str, value: Any) -> int | float:
    """A limit's value as the start request carries it; BatchError saying what it must be."""
    if key == "cpu":
        if type(value) in (int, float) and 0 < value < float("inf"):
            return float(value)
    elif key == "pids":
        if type(value) is int and value >= 2:
            return int(value)
    elif type(value) is int and value > 0:
        return int(value)
    elif isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            pass
    raise BatchError(f"{where}: '{key}' must be {LIMITS[key]}, not {value!r}")


class Progress:
    """One status line per job: redrawn in place on a terminal, else a line per ending.

    On a terminal only the ticker draws, so a batch of N jobs costs N lines per tick,
    not N lines per job that ends.
    """

    def __init__(self, out: IO[str], names: list[str], tty: bool, quiet: bool = False) -> None:
        self.out = out
        self.names = names
        self.tty = tty
        self.quiet = quiet  # --json: stdout carries the JSON document alone
        self.records: list[JobRecord | None] = [None] * len(names)
        self._drawn = 0
        self._width = max(len(n) for n in names)

    def update(self, index: int, record: JobRecord) -> None:
        before = self.records[index]
        self.records[index] = record
        if not self.tty and not self.quiet and record.ended and (
                before is None or not before.ended):
            self.out.write(self._line(index, time.time()) + "\n")
            self.out.flush()

    def _line(self, index: int, now: float) -> str:
        r = self.records[index]
        state = "starting" if r is None else render.outcome(r)
        runtime = render.runtime(r, now) if r is not None else "-"
        return f"{self.names[index]:<{self._width}}  {state:<28}  {runtime}"

    def draw(self) -> None:
        now = time.time()
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        lines = "".join(f"\x1b[2K{self._line(i, now)}\n" for i in range(len(self.names)))
        self.out.write(up + lines)
        self.out.flush()
        self._drawn = len(self.names)


def run(client: Client, specs: list[JobSpec], *, wait: bool, as_json: bool,
        out: IO[str]) -> int:
    """Start every job pipelined on ``client``'s one connection; with ``wait``, wait for
    them all the same way, showing progress."""
    results = client.start_many(
        start_params(s.command, s.args, env=s.env, dir=s.dir, timeout=s.timeout,
                     user=s.user, isolate=s.isolate, **s.limits)
        for s in specs)
    records: list[JobRecord | None] = []
    problems: list[str] = []
    for spec, value in zip(specs, results, strict=True):
        if isinstance(value, JobRecord):
            records.append(value)
            if value.state == FAILED:
                problems.append(f"{spec.name}: {value.error}")
        else:
            records.append(None)
            problems.append(f"{spec.name}: {value.message}")
    if not wait:
        if as_json:
            out.write(json.dumps([r.to_wire() if r else None for r in records], indent=2) + "\n")
        else:
            for spec, r in zip(specs, records, strict=True):
                out.write(f"{r.id if r else '-'}  {spec.name}\n")
        _report(problems)
        return 1 if problems else 0

    tty = out.isatty() and not as_json
    progress = Progress(out, [s.name for s in specs], tty, quiet=as_json)
    for i, r in enumerate(records):
        if r is not None:
            progress.update(i, r)
    waiting = [i for i, r in enumerate(records) if r is not None and not r.ended]
    ids = [records[i].id for i in waiting]  # type: ignore[union-attr]
    if tty:
        progress.draw()
    try:
        finals = client.wait_many(ids, lambda n, record: progress.update(waiting[n], record),
                                  progress.draw if tty else None, TICK)
    finally:
        if tty:
            progress.draw()
    for n, final in enumerate(finals):
        if isinstance(final, JobWorkerError):
            problems.append(f"{specs[waiting[n]].name}: {final.message}")
    ended = progress.records
    if as_json:
        out.write(json.dumps([r.to_wire() if r else None for r in ended], indent=2) + "\n")
    else:
        out.write("\n" + summary(specs, ended, time.time()))
    failed = [r for r in ended if r is None or r.state == FAILED or r.exit_status() != 0]
    _report(problems)
    return 1 if failed or problems else 0


def _report(problems: list[str]) -> None:
    import sys

    for p in problems:
        sys.stderr.write(f"jwclient: {p}\n")


def summary(specs: list[JobSpec], records: list[JobRecord | None], now: float) -> str:
    rows = [("NAME", "ID", "RESULT", "RUNTIME")]
    for spec, r in zip(specs, records, strict=True):
        rows.append((spec.name, r.id if r else "-", render.outcome(r) if r else "not started",
                     render.runtime(r, now) if r else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(f"{c:<{w}}" for c, w in zip(row[:3], widths, strict=True)), row[3]]).rstrip()
             for row in rows]
    ok = sum(1 for r in records if r is not None and r.exit_status() == 0 and r.state != FAILED)
    lines.append(f"{ok} of {len(records)} jobs succeeded")
    return "\n".join(lines) + "\n"
