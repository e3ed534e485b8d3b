"""The durable queue: admitting 10,000 queued jobs, keeping two slots busy, status beside a
long queue.

Two daemons of this checkout with ``--max-running 2`` (the default sqlite table), each
with both slots held by a ``sleep`` job.  Admission: ``jwclient submit`` of one file of
10,000 ``/bin/true`` jobs (all queued), timed wall to wall on one of them (target under
5 s; the daemon's CPU per admitted job, utime + stime, for information).  Status: ``status`` of the same running job, one request at a time over a kept-open
connection, in windows of 200 alternating between the daemon holding the 10,000 queued
jobs and its idle twin (nothing queued), ten rounds: the median over rounds of the ratio
of their p50s (target <= 1.10).  Slots: then the blockers are stopped and the 10,000 jobs run two at a time; from
their records (``started_at`` of a job from the queue is its spawn, ``ended_at`` when the
daemon reaped it) the idle time of a slot is, for the k-th job to end, the time until the
k-th job started from the queue (each end frees the slot the next start takes), p50
target under 2 ms; the whole drain's jobs per second is for information.  ``--quick``:
1,000 jobs, two rounds.
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import ab
import harness
from harness import SLEEP, TRUE, Bench, Figure, Result, percentile
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

WINDOW = 200


def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def batch_file(path: Path, count: int) -> None:
    path.write_text(f'[[job]]\ncommand = "{TRUE}"\n' * count)


async def blockers(client: Any, bench: Bench) -> list[str]:
    """Two ``sleep`` jobs holding both slots."""
    ids = []
    for _ in range(2):
        record = await client.call("start", {"command": SLEEP, "args": ["600"],
                                             "timeout": 605.0})
        bench.job_pids.add(record["pid"])
        harness.record_pid(record["pid"])
        ids.append(record["id"])
    return ids


async def status_window(client: Any, job: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        await client.call("status", {"job": job})
        samples.append(time.perf_counter() - began)
    return samples


def main() -> None:
    opts = harness.cli(__doc__ or "", lambda p: p.add_argument(
        "--count", type=int, help="queued jobs (10,000; --quick: 1,000)"))
    count = opts.count or (1_000 if opts.quick else 10_000)
    rounds = 2 if opts.quick else 10
    result = Result("scheduling", harness.how(__doc__))
    args = ("--max-running", "2")
    with Bench("queue", args) as busy, Bench("queue-idle", args) as idle:
        path = busy.tmp / "batch.toml"
        batch_file(path, count)

        measured: dict[str, Any] = {}

        async def measure(reactor: Any) -> None:
            [b], [i] = await harness.connect(reactor, busy), await harness.connect(reactor, idle)
            try:
                busy_blockers, idle_blockers = await blockers(b, busy), await blockers(i, idle)
                began, cpu = time.perf_counter(), ab.cpu_seconds(busy.pid)
                submitted = await deferToThread(
                    subprocess.run, busy.jwclient_argv("submit", str(path)),
                    capture_output=True, timeout=300)
                measured["admit"] = time.perf_counter() - began
                measured["admit_cpu"] = ab.cpu_seconds(busy.pid) - cpu
                if submitted.returncode != 0:
                    raise RuntimeError(f"submit failed: {submitted.stderr[-2000:]!r}")
                queues = await b.call("queues")
                if queues["queued"] != count:
                    raise RuntimeError(f"expected {count} queued, found {queues}")
                near, far, ratios = [], [], []
                for r in range(rounds):
                    windows: dict[int, list[float]] = {}
                    pair = [(b, busy_blockers[0], near), (i, idle_blockers[0], far)]
                    for client, job, into in (pair if r % 2 == 0 else pair[::-1]):
                        windows[id(into)] = await status_window(client, job, WINDOW)
                        into.extend(windows[id(into)])
                    ratios.append(percentile(windows[id(near)], 50)
                                  / percentile(windows[id(far)], 50))
                measured["status"] = (percentile(near, 50), percentile(far, 50))
                measured["status_ratios"] = ratios
                began = time.perf_counter()
                for job in busy_blockers:
                    await b.call("stop", {"job": job, "grace": 1.0})
                while True:
                    queues = await b.call("queues")
                    if not queues["running"] and not queues["queued"]:
                        break
                    await deferLater(reactor, 0.2, lambda: None)
                measured["drain"] = time.perf_counter() - began
                measured["records"] = await b.list()
                for job in idle_blockers:
                    await i.call("stop", {"job": job, "grace": 1.0})
            finally:
                harness.close_all([b, i])

        harness.run_on_reactor(measure)
    result.add(Figure(f"admit {count:,} queued jobs (one submit)", measured["admit"], "s",
                      target="<= 5"))
    result.add(Figure("  daemon CPU per admitted job", measured["admit_cpu"] / count * 1e6,
                      "us"))
    near, far = measured["status"]
    ratios = measured["status_ratios"]
    result.add(Figure(f"status p50, {count:,} queued", near * 1e3, "ms",
                      baseline="idle twin", baseline_value=far * 1e3, target="<= 1.10",
                      ratio=percentile(ratios, 50),
                      note=f"median of {len(ratios)} paired rounds' ratios, "
                           f"{min(ratios):.2f}-{max(ratios):.2f}"))
    records = [r for r in measured["records"] if r.command == TRUE]
    ends = sorted(when(r.ended_at) for r in measured["records"] if r.ended_at)
    starts = sorted(when(r.started_at) for r in records if r.started_at)
    gaps = [s - e for s, e in zip(starts, ends, strict=False)]
    if len(records) != count or len(starts) != count:
        raise RuntimeError(f"{len(records)} records, {len(starts)} started, of {count}")
    result.add(Figure("slot idle between a job's end and the next start, p50",
                      percentile(gaps, 50) * 1e3, "ms", target="<= 2"))
    result.add(Figure("slot idle, p90", percentile(gaps, 90) * 1e3, "ms"))
    result.add(Figure(f"drain of {count:,} queued /bin/true, 2 at a time",
                      count / measured["drain"], "jobs/s"))
    result.notes.append(f"{sum(g < 0 for g in gaps)} of {len(gaps)} pairs had the start "
                        "before the end it was paired with (two slots end close together)")
    harness.finish(result, opts.json)


if __name__ == "__main__":
    main()
