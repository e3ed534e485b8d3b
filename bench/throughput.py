"""Start throughput: jobs started per second with 1, 4 and 16 concurrent clients, idle and
with 1,000 jobs already running.

How: C clients (one TLS connection each, all in this process) each send
``start /bin/true`` and wait for the reply, back to back, for a fixed window; the rate is
replies / time until the last reply.  Then 1,000 ``sleep`` jobs are started and left
running, and the same is measured again.

Baseline, same run: an ``os.posix_spawn`` loop of /bin/true in this process reaping its
children as it goes (no reactor, no TLS, no log files), before and after the daemon runs.
Targets: >= 0.4 x baseline; with 1,000 running, >= 0.8 x the same client count idle.
"""

from __future__ import annotations

import time
from typing import Any

import harness
from harness import TRUE, Bench, Figure, Result, say

CLIENTS = (1, 4, 16)


def run(quick: bool) -> Result:
    window = 1.0 if quick else 4.0
    background = 200 if quick else 1000
    result = Result("throughput", __doc__.split("\n\n")[1].replace("\n", " "))
    say(__doc__)
    say(f"  {window:g}s per window, {background} background jobs")

    base = [harness.bare_spawn_rate(TRUE, window)]
    with Bench("throughput", stop_timeout=90.0) as bench:
        idle, busy = harness.run_on_reactor(
            lambda reactor: measure(reactor, bench, window, background))
    base.append(harness.bare_spawn_rate(TRUE, window))
    say(f"  baseline posix_spawn loop: {base[0]:.0f}/s before, {base[1]:.0f}/s after")
    baseline = sum(base) / len(base)

    for n in CLIENTS:
        result.add(Figure(f"start throughput, {n} client{'s' if n > 1 else ''}", idle[n],
                          "jobs/s", "posix_spawn loop", baseline, ">= 0.4"))
    for n in CLIENTS:
        result.add(Figure(f"start throughput, {n} client{'s' if n > 1 else ''}, "
                          f"{background} running", busy[n], "jobs/s",
                          "same, 0 running", idle[n], ">= 0.8"))
    result.series["throughput"] = {"clients": list(CLIENTS),
                                   "idle": [idle[n] for n in CLIENTS],
                                   "busy": [busy[n] for n in CLIENTS],
                                   "background": background, "baseline": baseline}
    return result


async def measure(reactor: Any, bench: Bench, window: float,
                  background: int) -> tuple[dict[int, float], dict[int, float]]:
    clients = await harness.connect(reactor, bench, max(CLIENTS))
    try:
        idle = {n: await rate(clients[:n], window) for n in CLIENTS}
        say(f"  starting {background} sleep jobs...")
        began = time.perf_counter()
        records = await harness.start_background(reactor, bench, clients[0], background)
        say(f"  ... started in {time.perf_counter() - began:.2f}s")
        busy = {n: await rate(clients[:n], window) for n in CLIENTS}
        await harness.stop_jobs(clients[0], records)
        return idle, busy
    finally:
        harness.close_all(clients)


async def rate(clients: list[Any], window: float) -> float:
    from twisted.internet.defer import gatherResults

    params = {"command": TRUE, "args": []}
    await gatherResults([c.call("start", params) for c in clients for _ in range(5)])  # warm
    done = [0]
    deadline = time.perf_counter() + window

    async def loop(client: Any) -> None:
        while time.perf_counter() < deadline:
            record = await client.call("start", params)
            if record["state"] == "failed":
                raise RuntimeError(f"start failed: {record['error']}")
            done[0] += 1

    from twisted.internet.defer import Deferred

    began = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(loop(c)) for c in clients])
    value = done[0] / (time.perf_counter() - began)
    say(f"  {len(clients):>2} clients: {value:.0f} starts/s")
    return value


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
