"""Start latency: how long one client waits for ``start /bin/true`` to be acknowledged.

How: one client on a warm connection (TLS handshake, hello and 50 warm-up starts done)
sends ``start {"command": "/bin/true"}`` and waits for the reply (the job record), one at a
time, N times; each sample is the wall time from sending to the reply.  The jobs exit at
once and the daemon reaps them meanwhile, as it would in real use.

Baseline, same run: a blocking ``os.posix_spawn`` + ``waitpid`` of /bin/true in this
process (no reactor, no TLS), N/2 times before and N/2 times after the daemon's samples.
Target: daemon p50 <= 2.5 x baseline p50.  For scale, also timed: the same spawn + wait
preceded by what jobworker makes per job (a directory and its two log files), on the
same file system as the daemon's state directory.
"""

from __future__ import annotations

import time
from typing import Any

import harness
from harness import TRUE, Bench, Figure, Result, percentile, quantiles, say


def run(quick: bool) -> Result:
    count = 300 if quick else 3000
    result = Result("start_latency", harness.how(__doc__))
    say(__doc__)
    say(f"  {count} samples each")

    with Bench("start_latency") as bench:
        logs = harness.LogDirs(bench.tmp / "bare-logs")
        baseline = harness.bare_spawn_wait(TRUE, count // 2)
        with_logs = harness.bare_spawn_wait(TRUE, count // 2, logs)
        samples = harness.run_on_reactor(lambda reactor: measure(reactor, bench, count))
        baseline += harness.bare_spawn_wait(TRUE, count - count // 2)
        with_logs += harness.bare_spawn_wait(TRUE, count - count // 2, logs)

    ms = [s * 1000 for s in samples]
    base_ms = [s * 1000 for s in baseline]
    result.add(Figure("start latency p50", percentile(ms, 50), "ms",
                      "posix_spawn+waitpid p50", percentile(base_ms, 50), "<= 2.5"))
    result.add(Figure("start latency p99", percentile(ms, 99), "ms",
                      "posix_spawn+waitpid p99", percentile(base_ms, 99)))
    logs_ms = [s * 1000 for s in with_logs]
    result.add(Figure("  start latency p50, against spawn+wait that also makes a log dir",
                      percentile(ms, 50), "ms", "same + mkdir, 2 files", percentile(logs_ms, 50)))
    result.series["start_latency_ms"] = {"jobworker": quantiles(ms), "baseline": quantiles(base_ms),
                                         "baseline_logs": quantiles(logs_ms), "count": count}
    return result


async def measure(reactor: Any, bench: Bench, count: int) -> list[float]:
    (client,) = await harness.connect(reactor, bench)
    params = {"command": TRUE, "args": []}
    try:
        for _ in range(50):
            await client.call("start", params)
        samples = []
        for _ in range(count):
            began = time.perf_counter()
            record = await client.call("start", params)
            samples.append(time.perf_counter() - began)
            if record["state"] == "failed":
                raise RuntimeError(f"start failed: {record['error']}")
        return samples
    finally:
        harness.close_all([client])


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
