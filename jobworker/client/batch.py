"""``jwclient submit``: a batch of jobs from a TOML file, started over one connection.

The file is an array of ``[[job]]`` tables: ``command`` and optional ``args`` (list),
``env`` (table), ``dir``, ``name``, ``timeout`` (seconds), ``queue``, ``priority``,
``labels`` (table) and ``after`` (names of earlier jobs of the file); ``unique_names =
true`` at the top sends each job's ``name`` as its name on the daemon.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass, field, replace
from typing import IO, Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from jobworker.client import render
from jobworker.client.api import Client, start_params
from jobworker.wire.errors import JobWorkerError, UnknownMethod
from jobworker.wire.record import FAILED, QUEUED, RUNNING, JobRecord

MAX_JOBS = 10000
#: Requests one batch keeps in flight: the daemon refuses more than 256 per connection.
IN_FLIGHT = 128
#: Starts sent in one ``start_many`` (the daemon's most), and about the most bytes of
#: them: under the daemon's default 64 KiB --max-frame.
START_MANY = 256
CHUNK_BYTES = 48 * 1024
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
    unknown = set(job) - {"name", "command", "args", "env", "dir", "timeout", "queue",
                          "priority", "after", "labels"}
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
                   directory, float(timeout) if timeout is not None else None, queue,
                   priority, list(after), [f"{k}={v}" for k, v in labels.items()],
                   unique_names and "name" in job)


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


async def run(reactor: Any, client: Client, specs: list[JobSpec], *, wait: bool,
              as_json: bool, out: IO[str]) -> int:
    limit = DeferredSemaphore(IN_FLIGHT)
    # Each job's start, by its name in the file: a job ``after`` others is started once
    # theirs have been answered (their ids are what it sends).
    by_name: dict[str, Deferred[JobRecord]] = {}

    async def start_one(spec: JobSpec) -> JobRecord:
        after: list[str | int] = []
        for dep in spec.after:
            record = await _copy(by_name[dep])
            after.append(record.id)
        return await limit.run(lambda: Deferred.fromCoroutine(client.start(
            spec.command, spec.args, env=spec.env, dir=spec.dir, timeout=spec.timeout,
            queue=spec.queue, priority=spec.priority, after=after, labels=spec.labels,
            name=spec.name if spec.send_name else None)))

    async def start_chunk(chunk: list[tuple[JobSpec, Deferred[JobRecord]]]) -> None:
        """Jobs that wait for no other, many in one ``start_many``; one at a time from a
        daemon that has no such method."""
        params = [start_params(s.command, s.args, env=s.env, dir=s.dir, timeout=s.timeout,
                               queue=s.queue, priority=s.priority, labels=s.labels,
                               name=s.name if s.send_name else None) for s, _ in chunk]
        try:
            answers: list[Any] = await limit.run(
                lambda: Deferred.fromCoroutine(client.start_many(params)))
        except UnknownMethod:
            answers = []
            for spec, _ in chunk:
                try:
                    answers.append(await start_one(spec))
                except JobWorkerError as e:
                    answers.append(e)
        except JobWorkerError as e:
            answers = [e] * len(chunk)
        for (_, d), answer in zip(chunk, answers, strict=True):
            if isinstance(answer, JobWorkerError):
                d.errback(answer)
            else:
                d.callback(answer)

    starts: list[Deferred[JobRecord]] = []
    chunks: list[list[tuple[JobSpec, Deferred[JobRecord]]]] = [[]]
    size = 0
    for s in specs:
        if s.after:
            d = Deferred.fromCoroutine(start_one(s))
        else:
            d = Deferred()
            one = len(s.command) + sum(len(a) + 1 for a in s.args + s.env + s.labels) + 64
            if len(chunks[-1]) >= START_MANY or size + one > CHUNK_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append((s, d))
            size += one
        by_name[s.name] = d
        starts.append(d)
    def lost(failure: Failure, chunk: list[tuple[JobSpec, Deferred[JobRecord]]]) -> None:
        for _, d in chunk:
            if not d.called:
                d.errback(failure)

    for chunk in chunks:
        if chunk:
            Deferred.fromCoroutine(start_chunk(chunk)).addErrback(lost, chunk)
    results = await DeferredList(starts, consumeErrors=True)
    records: list[JobRecord | None] = []
    problems: list[str] = []
    value: Any
    for spec, (ok, value) in zip(specs, results, strict=True):
        if ok:
            records.append(value)
            if value.state == FAILED:
                problems.append(f"{spec.name}: {value.error}")
        else:
            records.append(None)
            err = value.value  # a Failure
            problems.append(f"{spec.name}: {err.message if isinstance(err, JobWorkerError) else err}")
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
    ticker = None
    if tty:
        ticker = LoopingCall(progress.draw)
        ticker.clock = reactor
        ticker.start(TICK)
    # Queued jobs that have started since: the jobs of the batch no longer queued.
    me = (await client.call("whoami"))["identity"] if progress.queued() else None

    async def look() -> None:
        if not progress.queued():
            return
        still = {r.id for r in await client.list(state=QUEUED, owner=me)}
        for i in progress.queued():
            r = progress.records[i]
            if r is not None and r.id not in still:
                progress.update(i, replace(r, state=RUNNING))

    looker = LoopingCall(lambda: Deferred.fromCoroutine(look()).addErrback(lambda _: None))
    looker.clock = reactor
    if me is not None:
        looker.start(LOOK_EVERY, now=False)

    async def wait_one(index: int, record: JobRecord) -> None:
        try:
            final = await client.record("wait", record.id)
        except JobWorkerError as e:
            problems.append(f"{specs[index].name}: {e.message}")
            return
        progress.update(index, final)

    def waited(index: int, record: JobRecord) -> Deferred[None]:
        return Deferred.fromCoroutine(wait_one(index, record))

    try:
        await DeferredList([limit.run(waited, i, r)
                            for i, r in enumerate(records) if r is not None and not r.ended],
                           consumeErrors=True)
    finally:
        if looker.running:
            looker.stop()
        if ticker is not None:
            ticker.stop()
            progress.draw()
    finals = progress.records
    if as_json:
        out.write(json.dumps([r.to_wire() if r else None for r in finals], indent=2) + "\n")
    else:
        out.write("\n" + summary(specs, finals, time.time()))
    failed = [r for r in finals if r is None or r.state == FAILED or r.exit_status() != 0]
    _report(problems)
    return 1 if failed or problems else 0


async def _copy(d: Deferred[JobRecord]) -> JobRecord:
    """``d``'s result without taking it from its other waiters."""
    waiter: Deferred[JobRecord] = Deferred()

    def both(result: Any) -> Any:
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)
        return result

    d.addBoth(both)
    return await waiter


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
