"""Start throughput: jobs started per second with 1, 4 and 16 concurrent clients, idle and
with 1,000 jobs already running.

How: C clients (one TLS connection each, all in this process) each send
``start /bin/true`` and wait for the reply, back to back, for a fixed window; the rate is
replies / time until the last reply.  Then 1,000 ``sleep`` jobs are started and left
running, and the same is measured again; they are stopped, and the round repeats.

Baseline, same run, at the start of every round: an ``os.posix_spawn`` loop of /bin/true
in this process reaping its children as it goes (no reactor, no TLS, no log files).
Medians over the rounds.  For scale, the same loop also making what jobworker makes per
job before spawning (a directory and two files for stdout and stderr) is measured too.
Targets: >= 0.4 x baseline; with 1,000 running, >= 0.8 x the same client count idle.
"""

from __future__ import annotations

import time
from typing import Any

import harness
from harness import TRUE, Bench, Figure, Result, median, say

CLIENTS = (1, 4, 16)


def run(quick: bool) -> Result:
    window = 0.75 if quick else 1.5
    rounds = 1 if quick else 5  # the one-client figure moves +-12% from round to round
    background = 200 if quick else 1000
    result = Result("throughput", harness.how(__doc__))
    say(__doc__)
    say(f"  {rounds} rounds of {window:g}s windows, {background} background jobs")

    with Bench("throughput", stop_timeout=90.0) as bench:
        base, base_logs, idle, busy = harness.run_on_reactor(
            lambda reactor: measure(reactor, bench, window, rounds, background))
    baseline = median(base)
    for n in CLIENTS:
        result.add(Figure(f"start throughput, {n} client{'s' if n > 1 else ''}",
                          median(idle[n]), "jobs/s", "posix_spawn loop", baseline, ">= 0.4"))
    floor = median(base_logs)
    for n in CLIENTS:
        result.add(Figure(f"  {n} client{'s' if n > 1 else ''}, against a loop that also "
                          "makes log dirs", median(idle[n]), "jobs/s",
                          "posix_spawn loop + log dirs", floor))
    for n in CLIENTS:
        result.add(Figure(f"start throughput, {n} client{'s' if n > 1 else ''}, "
                          f"{background} running", median(busy[n]), "jobs/s",
                          "same, 0 running", median(idle[n]), ">= 0.8"))
    result.series["throughput"] = {"clients": list(CLIENTS),
                                   "idle": [median(idle[n]) for n in CLIENTS],
                                   "busy": [median(busy[n]) for n in CLIENTS],
                                   "background": background, "baseline": baseline,
                                   "baseline_with_logs": floor,
                                   "rounds": {"baseline": base, "idle": idle, "busy": busy}}
    return result


async def measure(reactor: Any, bench: Bench, window: float, rounds: int, background: int
                  ) -> tuple[list[float], list[float], dict[int, list[float]],
                             dict[int, list[float]]]:
    """Each round: the bare loop, then every client count idle, then with the background
    jobs running; medians over rounds, so a slow spell on the machine hits all sides."""
    clients = await harness.connect(reactor, bench, max(CLIENTS))
    base: list[float] = []
    base_logs: list[float] = []
    logs = harness.LogDirs(bench.tmp / "bare-logs")
    idle: dict[int, list[float]] = {n: [] for n in CLIENTS}
    busy: dict[int, list[float]] = {n: [] for n in CLIENTS}
    try:
        for i in range(rounds):
            # Blocking on purpose (the floor without a loop); the clients just wait.
            base.append(harness.bare_spawn_rate(TRUE, window))
            base_logs.append(harness.bare_spawn_rate(TRUE, window, logs))
            for n in CLIENTS:
                idle[n].append(await rate(clients[:n], window))
            began = time.perf_counter()
            records = await harness.start_background(reactor, bench, clients[0], background)
            took = time.perf_counter() - began
            for n in CLIENTS:
                busy[n].append(await rate(clients[:n], window))
            await harness.stop_jobs(clients[0], records)
            say(f"  round {i + 1}: bare loop {base[-1]:.0f}/s, with log dirs "
                f"{base_logs[-1]:.0f}/s; clients "
                + ", ".join(f"{n}: {idle[n][-1]:.0f}/s" for n in CLIENTS)
                + f"; {background} started in {took:.1f}s; then "
                + ", ".join(f"{n}: {busy[n][-1]:.0f}/s" for n in CLIENTS))
        return base, base_logs, idle, busy
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
    return done[0] / (time.perf_counter() - began)


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
