"""The job table: sqlite against memory start throughput; costs of a 100,000-job history.

Throughput: three daemons of this checkout, ``--store memory``, ``--store sqlite`` and
``--store sqlite --fsync``, each loaded in turn by one client keeping 16 ``start /bin/true``
in flight, in paired windows whose order alternates every round (memory, sqlite, fsync,
then the reverse), as bench/ab.py does, so a slow spell of the machine falls on every side.
The figure is the median over rounds of each round's sqlite/memory ratio of jobs per second
(target >= 0.85), with its spread; daemon CPU per start (utime + stime of every thread) and
``--fsync`` are for information.

History: a state directory whose ``jobs.db`` holds 100,000 ended jobs, written before the
daemon starts through the store's own code (``jobworker.jobs.sql.write`` of rows made by
``jobworker.jobs.durable.row_of`` from real ``Job`` objects, all owned by the benchmark's
identity), against a fresh state directory (0 jobs).  Start-up: seconds from spawning
``twistd`` to the ``jobworker.listening`` line (the listener accepting), each daemon
started three times, alternately, median taken (the table's file is in the page cache).
RSS: VmRSS of /proc/PID/status 0.5 s after each start-up.  Then, over one kept-open
connection, one request at a time and timed at the client: ``list`` with ``limit=100`` and
``status`` of old jobs by id (ids drawn from the oldest half), p50; the 0-job daemon runs
100 ``/bin/true`` first so that its ``list`` returns the same 100 records and its
``status`` reads an ended job back from the table too.  Targets: RSS < 100 MB (10^6 bytes),
start-up < 2 s, ``list`` p50 < 20 ms, ``status`` p50 < 2 ms.  ``--quick`` (what the
suite's smoke test runs): 5,000 jobs, two rounds, fewer calls: it checks that everything
runs, not the figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ab
import harness
from harness import BIN, TRUE, Bench, Figure, Result, percentile, record_pid, say

MB = 1e6
INFLIGHT = 16
HISTORY = 100_000


# -- seeding the table -------------------------------------------------------------------------


def ended_rows(count: int, owner: str, log_root: str, now: float) -> Iterator[Any]:
    """``count`` ended jobs, oldest first, ten a second up to ``now``, as the daemon writes
    them: a real ``Job`` ended the way ``Job._finish`` ends it, made a row by ``row_of``."""
    from jobworker.jobs.durable import row_of
    from jobworker.jobs.job import Job
    from jobworker.jobs.logs import LogStore
    from jobworker.wire.record import EXITED
    from jobworker.wire.timestamps import iso8601

    logs = LogStore(log_root)
    rng = random.Random(1)
    for i in range(count):
        job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        started = now - (count - i) * 0.1
        job = Job(None, id=job_id, owner=owner, command=TRUE, args=["--item", str(i)],
                  dir="/", log_dir=logs.dir_for(job_id, started), started=started,
                  timeout=None, timeout_grace=5.0, signal_group=_unused, on_ended=_unused)
        job.pid = 1000 + i % 30000
        job.spawn_ticks = (int(started * 100), int(started * 100) + 1)
        job.uid = job.gid = 61184  # the first of --dynamic-uids: what a root daemon gives
        job.state = EXITED
        job.exit_code = 1 if i % 7 == 0 else 0
        job.ended_time = started + 0.003
        job.ended_at = iso8601(job.ended_time)
        yield row_of(job)


def _unused(*args: object) -> None:
    raise AssertionError("a seeded job never runs")


def seed(db: Path, count: int, owner: str) -> list[str]:
    """Write ``count`` ended jobs into a new table at ``db``, 10,000 a transaction; their
    ids, oldest first."""
    from jobworker.jobs import sql

    conn = sql.connect(str(db))
    # Only this writer's speed: 64 MiB of page cache, and no cyclic GC passes over the
    # Jobs made here (the file written is the same either way).
    conn.execute("PRAGMA cache_size = -65536")
    gc.disable()
    try:
        sql.migrate(conn, str(db))
        ids: list[str] = []
        batch: list[Any] = []
        for row in ended_rows(count, owner, str(db.parent / "logs"), time.time() - 60):
            batch.append(row)
            ids.append(row.id)
            if len(batch) == 10_000:
                sql.write(conn, batch)
                batch = []
        if batch:
            sql.write(conn, batch)
    finally:
        gc.enable()
        conn.close()  # the last connection: checkpoints the WAL into jobs.db
    return ids


# -- daemons -----------------------------------------------------------------------------------


class TableBench(Bench):
    """A Bench whose table is seeded before the daemon first starts, and whose start-up
    is timed: ``startups`` (seconds) and ``rss_at_start`` (bytes), one per start."""

    def __init__(self, name: str, history: int = 0, daemon_args: Sequence[str] = ()) -> None:
        super().__init__(name, daemon_args)
        self.history = history
        self.ids: list[str] = []
        self.seed_seconds = 0.0
        self.startups: list[float] = []
        self.rss_at_start: list[int] = []

    def __enter__(self) -> TableBench:
        try:
            self._make_pki()
            if self.history:
                self.state_dir.mkdir(mode=0o750)
                began = time.perf_counter()
                self.ids = seed(self.state_dir / "jobs.db", self.history, harness.IDENTITY)
                self.seed_seconds = time.perf_counter() - began
            self.start_daemon()
        except BaseException:
            self.close()
            raise
        return self

    def start_daemon(self, timeout: float = 30.0) -> None:
        """As Bench's, but timed, polling every 2 ms, and reading only what this start
        logged (the log is appended to across restarts)."""
        cmd = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "jobworker",
               "--pki", str(self.pki_dir), "--state-dir", str(self.state_dir),
               "--listen", "tcp:0:interface=127.0.0.1", *self.daemon_args]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            began = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=str(self.tmp), env={**os.environ, **self.daemon_env})
        record_pid(self.proc.pid)
        listening = re.compile(rb"jobworker\.listening host=\S+ port=(\d+)")
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            seen = b""
            while True:
                seen += log.read()
                m = listening.search(seen)
                if m:
                    self.startups.append(time.perf_counter() - began)
                    self.port = int(m.group(1))
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError(f"twistd exited {self.proc.returncode}:\n"
                                       f"{seen.decode(errors='replace')[-3000:]}")
                if time.perf_counter() - began > timeout:
                    raise RuntimeError(f"daemon not listening after {timeout}s")
                time.sleep(0.002)  # outside any reactor: a plain poll of the log file
        time.sleep(0.5)  # let start-up's last work (spare log directories) settle
        self.rss_at_start.append(self.rss())

    def restart(self) -> None:
        self.stop_daemon()
        self.start_daemon()


# -- measuring on the reactor ------------------------------------------------------------------


async def throughput(reactor: Any, sides: dict[str, Bench], rounds: int, seconds: float
                     ) -> dict[str, list[tuple[float, float, float]]]:
    """Per side, per round: (jobs/s, daemon CPU us per job, client CPU us per job)."""
    clients = {name: await harness.connect(reactor, bench) for name, bench in sides.items()}
    params = {"command": TRUE, "args": []}
    out: dict[str, list[tuple[float, float, float]]] = {name: [] for name in sides}
    try:
        for i in range(rounds):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in order:
                out[name].append(await ab.window(sides[name], clients[name], "start", params,
                                                 seconds, INFLIGHT))
    finally:
        for c in clients.values():
            harness.close_all(c)
    return out


async def list_once(client: Any, params: dict[str, Any]) -> tuple[float, dict[str, Any], int]:
    """One ``list``: (seconds at the client, the final reply, records received)."""
    got = [0]

    def on_chunk(batch: Any) -> None:
        got[0] += len(batch)

    began = time.perf_counter()
    reply = await client.call("list", params, on_chunk)
    return time.perf_counter() - began, reply, got[0]


async def probe(reactor: Any, sides: dict[str, TableBench], rounds: int, lists: int,
                statuses: int) -> dict[str, dict[str, list[float]]]:
    """``list`` (limit 100) and ``status`` latencies on each side, rounds alternating;
    the 100,000-job side also ``list`` from a cursor half-way down the table."""
    from twisted.internet.defer import gatherResults

    clients = {name: (await harness.connect(reactor, bench))[0]
               for name, bench in sides.items()}
    try:
        for name, bench in sides.items():
            if not bench.ids:  # the 0-job daemon: 100 jobs, through it, all ended
                client = clients[name]
                records = await gatherResults([client.call("start", {"command": TRUE,
                                                                     "args": []})
                                               for _ in range(100)])
                for r in records:
                    await client.call("wait", {"job": r["id"]})
                bench.ids = [r["id"] for r in records]
        lookups: dict[str, list[str]] = {}
        cursors: dict[str, str | None] = {}
        rng = random.Random(2)
        for name, bench in sides.items():
            old = bench.ids[:max(len(bench.ids) // 2, 1)]
            lookups[name] = [rng.choice(old) for _ in range(statuses)]
            _, reply, got = await list_once(clients[name], {"limit": 100})
            if got != 100 or reply.get("count") != 100:
                raise RuntimeError(f"{name}: list limit=100 gave {got} records, {reply}")
            more = reply.get("next_cursor")
            cursors[name] = (str(int(more) - len(bench.ids) // 2)
                             if more is not None and len(bench.ids) > 1000 else None)
            for job_id in lookups[name][:50]:  # warm both paths
                await clients[name].call("status", {"job": job_id})
        out: dict[str, dict[str, list[float]]] = {
            name: {"list": [], "status": [], "deep": []} for name in sides}
        for i in range(rounds):
            for name in list(sides) if i % 2 == 0 else list(reversed(sides)):
                client = clients[name]
                for _ in range(lists):
                    took, _, got = await list_once(client, {"limit": 100})
                    out[name]["list"].append(took)
                if cursors[name] is not None:
                    for _ in range(lists):
                        took, _, got = await list_once(client, {"limit": 100,
                                                                "cursor": cursors[name]})
                        out[name]["deep"].append(took)
                for job_id in lookups[name]:
                    began = time.perf_counter()
                    await client.call("status", {"job": job_id})
                    out[name]["status"].append(time.perf_counter() - began)
        return out
    finally:
        harness.close_all(clients.values())


async def measure(reactor: Any, tput: dict[str, Bench], hist: dict[str, TableBench],
                  quick: bool, rounds: int, window: float) -> dict[str, Any]:
    probed = await probe(reactor, hist, rounds=2 if quick else 3, lists=30 if quick else 100,
                         statuses=200 if quick else 1000)
    rss_after = {name: bench.rss() for name, bench in hist.items()}
    rates = await throughput(reactor, tput, rounds, window)
    return {"probe": probed, "rss_after": rss_after, "throughput": rates}


# -- the run -----------------------------------------------------------------------------------


def run(quick: bool, rounds: int | None = None, window: float | None = None) -> Result:
    """``rounds`` and ``window`` (seconds) of the throughput comparison: more of them
    narrow the ratio's spread on a busy machine."""
    rounds = rounds or (2 if quick else 24)
    window = window or (0.3 if quick else 0.5)
    starts = 1 if quick else 3
    history = 5_000 if quick else HISTORY
    result = Result("table", harness.how(__doc__))
    say(__doc__)
    with TableBench("table-empty") as empty, TableBench("table-full", history) as full:
        say(f"  seeded {history:,} ended jobs in {full.seed_seconds:.1f}s "
            f"(jobs.db {os.path.getsize(full.state_dir / 'jobs.db') / MB:.0f} MB)")
        for i in range(starts - 1):  # more timed start-ups, alternating
            for bench in (full, empty) if i % 2 == 0 else (empty, full):
                bench.restart()
        say(f"  start-ups (s): 0 jobs {[round(s, 3) for s in empty.startups]}, "
            f"{history:,} jobs {[round(s, 3) for s in full.startups]}")
        with Bench("table-memory", ["--store", "memory"]) as memory, \
                Bench("table-sqlite", ["--store", "sqlite"]) as sqlite, \
                Bench("table-fsync", ["--store", "sqlite", "--fsync"]) as fsync:
            m = harness.run_on_reactor(lambda reactor: measure(
                reactor, {"memory": memory, "sqlite": sqlite, "fsync": fsync},
                {"empty": empty, "full": full}, quick, rounds, window))

    rates = m["throughput"]
    for name in rates:
        say(f"  {name:6s} jobs/s per round: {[round(r[0]) for r in rates[name]]}")
    paired = [s[0] / mm[0] for s, mm in zip(rates["sqlite"], rates["memory"], strict=True)]
    cpu = [s[1] / mm[1] for s, mm in zip(rates["sqlite"], rates["memory"], strict=True)]
    synced = [s[0] / mm[0] for s, mm in zip(rates["fsync"], rates["memory"], strict=True)]
    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired * 3)
    result.add(Figure(f"start throughput, --store sqlite ({INFLIGHT} in flight)",
                      _median(rates["sqlite"], 0), "jobs/s", "--store memory, paired windows",
                      _median(rates["memory"], 0), ">= 0.85", ratio=statistics.median(paired),
                      note=f"ratio over {len(paired)} rounds: {min(paired):.2f}-"
                           f"{max(paired):.2f}, quartiles {q1:.2f}-{q3:.2f}"))
    result.add(Figure("  daemon CPU per start, --store sqlite", _median(rates["sqlite"], 1),
                      "us", "--store memory", _median(rates["memory"], 1),
                      ratio=statistics.median(cpu)))
    result.add(Figure(f"  start throughput, --store sqlite --fsync ({INFLIGHT} in flight)",
                      _median(rates["fsync"], 0), "jobs/s", "--store memory, paired windows",
                      _median(rates["memory"], 0), ratio=statistics.median(synced),
                      note=f"ratio {min(synced):.2f}-{max(synced):.2f}"))

    n = f"{history:,} jobs"
    result.add(Figure(f"daemon start-up, {n} in the table", statistics.median(full.startups),
                      "s", "0 jobs", statistics.median(empty.startups), "<= 2",
                      target_on_value=True, note=f"median of {len(full.startups)}"))
    result.add(Figure(f"daemon RSS after start-up, {n}", statistics.median(full.rss_at_start) / MB,
                      "MB", "0 jobs", statistics.median(empty.rss_at_start) / MB, "<= 100",
                      target_on_value=True))
    probed = m["probe"]
    ms = {name: {k: [x * 1000 for x in v] for k, v in p.items()} for name, p in probed.items()}
    result.add(Figure(f"list limit=100 p50, {n}", percentile(ms["full"]["list"], 50), "ms",
                      "100 jobs", percentile(ms["empty"]["list"], 50), "<= 20",
                      target_on_value=True))
    result.add(Figure(f"  list limit=100 p99, {n}", percentile(ms["full"]["list"], 99), "ms",
                      "100 jobs", percentile(ms["empty"]["list"], 99)))
    if ms["full"]["deep"]:
        result.add(Figure(f"  list limit=100 from a cursor {history // 2:,} jobs back, p50",
                          percentile(ms["full"]["deep"], 50), "ms"))
    result.add(Figure(f"status of an old job p50, {n}", percentile(ms["full"]["status"], 50),
                      "ms", "100 jobs", percentile(ms["empty"]["status"], 50), "<= 2",
                      target_on_value=True))
    result.add(Figure(f"  status of an old job p99, {n}", percentile(ms["full"]["status"], 99),
                      "ms", "100 jobs", percentile(ms["empty"]["status"], 99)))
    result.add(Figure(f"  daemon RSS after the list and status calls, {n}",
                      m["rss_after"]["full"] / MB, "MB", "100 jobs",
                      m["rss_after"]["empty"] / MB))
    result.series["table"] = {"throughput_ratio_rounds": paired,
                              "startups_full": full.startups, "startups_empty": empty.startups}
    summary(result)
    return result


def _median(rows: list[tuple[float, float, float]], i: int) -> float:
    return statistics.median(r[i] for r in rows)


def summary(result: Result) -> None:
    """The figures with a target, and whether each was met."""
    say("\n  figure                                              value       target   result")
    for f in result.figures:
        if not f.target:
            continue
        on_value = f.target_on_value or f.baseline_value is None
        shown = f.value if on_value else f.ratio
        unit = f.unit if on_value else "(ratio)"
        say(f"  {f.figure:50s} {shown:9.3g} {unit:7s} {f.target:7s}  "
            f"{'pass' if f.met else 'FAIL'}")


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 24; quick 4)")
    parser.add_argument("--window", type=float,
                        help="seconds per throughput window (default 0.5; quick 0.3)")


if __name__ == "__main__":
    opts = harness.cli(__doc__, options)
    harness.finish(run(opts.quick, opts.rounds, opts.window), opts.json)
