"""Daemon memory: resident set size idle, with 1,000 running jobs, and per 10,000 ended
jobs kept in its history.

How: VmRSS of the daemon from /proc/PID/status.  Idle: after start-up and four clients'
hello, no job.  Running: after starting 1,000 ``sleep`` jobs (then stopped).  History:
RSS before and after 10,000 ``start /bin/true`` (4 clients, pipelined) have all ended;
the difference is the cost of 10,000 ended jobs (records, timers gone, log dirs on disk).
Baseline for the idle figure, same run: an idle Python process that imported what any
daemon of this kind needs (the Twisted reactor, pyOpenSSL, cryptography, msgpack).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import harness
from harness import TRUE, Bench, Figure, Result, rss_of, say

MIB = 1 << 20
BARE = ("import sys, time\n"
        "from twisted.internet import reactor\n"
        "import OpenSSL.SSL, cryptography.x509, msgpack\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n")


def run(quick: bool) -> Result:
    running = 200 if quick else 1000
    history = 1000 if quick else 10000
    result = Result("memory", harness.how(__doc__))
    say(__doc__)
    say(f"  {running} running jobs, {history} ended jobs")

    bare = bare_rss()
    with Bench("memory", stop_timeout=90.0) as bench:
        m = harness.run_on_reactor(lambda r: measure(r, bench, running, history))
    result.add(Figure("daemon RSS, idle", m["idle"] / MIB, "MiB",
                      "bare Python + Twisted + TLS libs", bare / MIB))
    result.add(Figure(f"daemon RSS, {running} running jobs", m["running"] / MIB, "MiB",
                      "same daemon idle", m["idle"] / MIB))
    per = (m["after"] - m["before"]) * 10000 / history
    result.add(Figure("daemon RSS per 10,000 ended jobs in history", per / MIB, "MiB",
                      note=f"measured over {history} jobs" if history != 10000 else ""))
    result.add(Figure("  = per ended job", per / 10000 / 1024, "KiB"))
    return result


def bare_rss() -> int:
    with subprocess.Popen([sys.executable, "-c", BARE], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.readline()
        rss = rss_of(proc.pid)
        proc.stdin.close()
        proc.wait(10)
    return rss


async def measure(reactor: Any, bench: Bench, running: int, history: int) -> dict[str, int]:
    from twisted.internet.defer import gatherResults

    clients = await harness.connect(reactor, bench, 4)
    try:
        await _settle(reactor)
        out = {"idle": bench.rss()}
        say(f"  idle: {out['idle'] / MIB:.1f} MiB")
        records = await harness.start_background(reactor, bench, clients[0], running)
        await _settle(reactor)
        out["running"] = bench.rss()
        say(f"  {running} running: {out['running'] / MIB:.1f} MiB")
        await harness.stop_jobs(clients[0], records)
        await _settle(reactor)
        out["before"] = bench.rss()
        params = {"command": TRUE, "args": []}
        began = time.perf_counter()
        per_client = history // len(clients)

        async def starts(client: Any) -> None:
            for i in range(0, per_client, 50):
                await gatherResults([client.call("start", params)
                                     for _ in range(min(50, per_client - i))])

        from twisted.internet.defer import Deferred

        await gatherResults([Deferred.fromCoroutine(starts(c)) for c in clients])
        while await clients[0].call("list", {"running": True}) != {"count": 0}:
            await _settle(reactor, 0.2)
        say(f"  {history} jobs started and ended in {time.perf_counter() - began:.1f}s")
        await _settle(reactor)
        out["after"] = bench.rss()
        say(f"  after {history} ended: {out['after'] / MIB:.1f} MiB "
            f"(+{(out['after'] - out['before']) / MIB:.1f})")
        return out
    finally:
        harness.close_all(clients)


async def _settle(reactor: Any, seconds: float = 0.5) -> None:
    from twisted.internet import task

    await task.deferLater(reactor, seconds, lambda: None)


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
