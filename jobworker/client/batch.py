"""``jwclient submit``: a batch of jobs from a TOML file, started over one connection.

The file is an array of ``[[job]]`` tables: ``command`` and optional ``args`` (list),
``env`` (table), ``dir``, ``name``, ``timeout`` (seconds), ``user``, ``isolate`` (list of
namespaces), the limits ``memory``, ``cpu``, ``pids``, ``io_read``, ``io_write`` (as
``jwclient start``'s options: sizes as ``512M`` or bytes), ``queue``, ``priority``,
``labels`` (table) and ``after`` (names of earlier jobs of the file); ``unique_names =
true`` at the top sends each job's ``name`` as its name on the daemon.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass, field, replace
from typing import IO, Any

from jobworker.client import render
from jobworker.client.sync import Client, start_params
from jobworker.wire.errors import ConnectionLost, JobWorkerError
from jobworker.wire.record import FAILED, ISOLATE, QUEUED, RUNNING, JobRecord
from jobworker.wire.sizes import parse_size

MAX_JOBS = 10000
#: Seconds between redraws of the progress lines on a terminal.
TICK = 0.25
#: A terminal shows one line per job for batches up to this size (then the counts only).
LINES_UP_TO = 50
#: Seconds between looks at which queued jobs of the batch have started.
LOOK_EVERY = 1.0


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
    queue: str | None = None
    priority: int = 0
    after: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    send_name: bool = False  # the file says unique_names = true


def load(path: str) -> list[JobSpec]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise BatchError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BatchError(f"{path} is not valid TOML: {e}") from None
    jobs = data.get("job")
    if set(data) - {"job", "unique_names"}:
        raise BatchError(f"{path}: only [[job]] tables and unique_names are allowed at the "
                         "top level")
    unique = data.get("unique_names", False)
    if not isinstance(unique, bool):
        raise BatchError(f"{path}: unique_names must be true or false")
    if not isinstance(jobs, list) or not jobs:
        raise BatchError(f"{path}: no [[job]] tables")
    if len(jobs) > MAX_JOBS:
        raise BatchError(f"{path}: more than {MAX_JOBS} jobs")
    specs = [_spec(path, i, job, unique) for i, job in enumerate(jobs, 1)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs, 1):
        for dep in spec.after:
            if dep not in seen:
                raise BatchError(f"{path}: job {i}: after names {dep!r}, which is not an "
                                 "earlier job of the file")
            if seen[dep] < 0:
                raise BatchError(f"{path}: job {i}: after names {dep!r}, which more than "
                                 "one earlier job is called")
        seen[spec.name] = -1 if spec.name in seen else i
    return specs


def _spec(path: str, index: int, job: Any, unique_names: bool = False) -> JobSpec:
    where = f"{path}: job {index}"
    if not isinstance(job, dict):
        raise BatchError(f"{where}: must be a table")
    unknown = set(job) - {"name", "command", "args", "env", "dir", "timeout", "user",
                          "isolate", *LIMITS, "queue", "priority", "after", "labels"}
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
    queue = job.get("queue")
    if queue is not None and (not isinstance(queue, str) or not queue):
        raise BatchError(f"{where}: 'queue' must be a queue's name")
    priority = job.get("priority", 0)
    if type(priority) is not int or not -1000 <= priority <= 1000:
        raise BatchError(f"{where}: 'priority' must be a whole number from -1000 to 1000")
    after = job.get("after", [])
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise BatchError(f"{where}: 'after' must be a list of names of earlier jobs")
    labels = job.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise BatchError(f"{where}: 'labels' must be a table of strings")
    return JobSpec(name, command, list(args), [f"{k}={v}" for k, v in env.items()],
                   directory, float(timeout) if timeout is not None else None, user,
                   list(isolate), limits, queue, priority, list(after),
                   [f"{k}={v}" for k, v in labels.items()], unique_names and "name" in job)


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
    """``N running, M queued, K done, F failed`` for the batch, and one status line per
    job: redrawn in place on a terminal (per-job lines only for a batch of at most
    LINES_UP_TO jobs), else a line per job as it ends, with the counts after it.

    On a terminal only the ticker draws, so a batch of N jobs costs at most N + 1 lines
    per tick, not lines per job that ends.
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
            self.out.write(f"{self._line(index, time.time())}  ({self.counts()})\n")
            self.out.flush()

    def counts(self) -> str:
        """``N running, M queued, K done, F failed`` (done: exited 0)."""
        running = queued = done = failed = 0
        for r in self.records:
            if r is None:
                continue
            if r.state == QUEUED:
                queued += 1
            elif not r.ended:
                running += 1
            elif r.state != FAILED and r.exit_status() == 0:
                done += 1
            else:
                failed += 1
        return f"{running} running, {queued} queued, {done} done, {failed} failed"

    def _line(self, index: int, now: float) -> str:
        r = self.records[index]
        state = "starting" if r is None else render.outcome(r)
        runtime = render.runtime(r, now) if r is not None else "-"
        return f"{self.names[index]:<{self._width}}  {state:<28}  {runtime}"

    def draw(self) -> None:
        now = time.time()
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        shown = range(len(self.names)) if len(self.names) <= LINES_UP_TO else range(0)
        lines = "".join(f"\x1b[2K{self._line(i, now)}\n" for i in shown)
        self.out.write(f"{up}{lines}\x1b[2K{self.counts()}\n")
        self.out.flush()
        self._drawn = len(shown) + 1

    def queued(self) -> list[int]:
        """Indexes of the jobs last seen queued."""
        return [i for i, r in enumerate(self.records) if r is not None and r.state == QUEUED]


def run(client: Client, specs: list[JobSpec], *, wait: bool, as_json: bool,
        out: IO[str]) -> int:
    """Start every job on ``client``'s one connection (many in each request, pipelined);
    with ``wait``, wait for them all the same way, showing progress."""
    results = _start_all(client, specs)
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
    # Queued jobs that have started since: the jobs of the batch no longer queued.
    me = client.whoami()["identity"] if progress.queued() else None
    last_look = time.monotonic()

    def tick() -> None:
        nonlocal last_look
        if me is not None and progress.queued() and time.monotonic() - last_look >= LOOK_EVERY:
            last_look = time.monotonic()
            try:
                still = {r.id for r in client.list(state=QUEUED, owner=me)}
            except JobWorkerError:  # looked again next time
                still = {progress.records[i].id for i in progress.queued()}  # type: ignore[union-attr]
            for i in progress.queued():
                r = progress.records[i]
                if r is not None and r.id not in still:
                    progress.update(i, replace(r, state=RUNNING))
        if tty:
            progress.draw()

    if tty:
        progress.draw()
    try:
        finals = client.wait_many(ids, lambda n, record: progress.update(waiting[n], record),
                                  tick if tty or me is not None else None, TICK)
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


def _start_all(client: Client, specs: list[JobSpec]) -> list[JobRecord | JobWorkerError]:
    """Each job's start, in order.  A job ``after`` others of the file is sent once theirs
    have been answered (their ids are what it sends), so the file goes in waves, each up
    to the first job that needs an answer not yet had; a job whose dependency could not
    be started is not sent either, and gets that error."""
    results: list[JobRecord | JobWorkerError | None] = [None] * len(specs)
    by_name: dict[str, int] = {}
    wave: list[tuple[int, dict[str, Any]]] = []
    unanswered: set[str] = set()

    def send() -> None:
        answers = client.start_many(params for _, params in wave)
        for (index, _), answer in zip(wave, answers, strict=True):
            results[index] = answer
        wave.clear()
        unanswered.clear()

    for index, spec in enumerate(specs):
        if unanswered.intersection(spec.after):
            send()
        deps = [results[by_name[dep]] for dep in spec.after]
        failed = next((d for d in deps if not isinstance(d, JobRecord)), None)
        if failed is not None:
            results[index] = failed
        else:
            wave.append((index, _params(spec, [d.id for d in deps])))  # type: ignore[union-attr]
            unanswered.add(spec.name)
        by_name[spec.name] = index
    if wave:
        send()
    return [r if r is not None else ConnectionLost("no reply") for r in results]


def _params(s: JobSpec, after: list[str]) -> dict[str, Any]:
    return start_params(s.command, s.args, env=s.env, dir=s.dir, timeout=s.timeout,
                        user=s.user, isolate=s.isolate, queue=s.queue,
                        priority=s.priority or None, after=after, labels=s.labels,
                        name=s.name if s.send_name else None, **s.limits)


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
