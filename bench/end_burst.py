"""What a burst of job ends does to other clients: ``status`` latency while N jobs end at once.

Run: .venv/bin/python bench/end_burst.py [--a CHECKOUT] [--b CHECKOUT] [--jobs 400]

How: for each checkout (A, then B; default B: this one), a real daemon with a cgroup per job
(harness.Bench, PYTHONPATH=<checkout>).  One client starts ``--jobs`` jobs of ``sh -c
'sleep S'``, each S chosen so that all of them end at the same wall-clock moment 3 s after
the first start; a second client meanwhile sends ``status`` of one ended job back to back,
from then until 2.5 s after that moment, and each reply's wait is a sample.  A job's end
(reaping, its cgroup released and recycled or removed, its ended record written) is work
on the reactor thread, and the burst is that work N times at once: printed are the
samples' p50, p99 and maximum for each side.  Why: the daemon recycles job cgroups on the
reactor thread, at most ``jobworker.jobs.cgpool.PER_TURN`` a turn; this shows what that
costs the others while a burst is handled.

Not part of run_all: it compares versions (``git worktree add /tmp/base <commit>``, then
``--a /tmp/base``).  Needs root and cgroups; says why not otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import harness
from harness import TRUE, Bench, percentile, say

from jobworker.jobs.cgroups import detect

#: Seconds from the first start to the moment every job ends; then how long to go on.
END_AFTER = 3.0
AFTER_END = 2.5
#: Starts sent at once while the jobs are started.
WAVE = 50


async def side(reactor: Any, name: str, checkout: str, jobs: int) -> list[float]:
    from twisted.internet.defer import gatherResults

    with Bench(f"end-burst-{name}", daemon_env={"PYTHONPATH": checkout}) as bench:
        starter, asker = await harness.connect(reactor, bench, 2)
        try:
            ref = await asker.call("start", {"command": TRUE, "args": []})
            at = time.time() + END_AFTER
            for i in range(0, jobs, WAVE):
                await gatherResults([starter.call("start", {
                    "command": "/bin/sh",
                    "args": ["-c", f"sleep {max(0.0, at - time.time()):.3f}"]})
                    for _ in range(min(WAVE, jobs - i))])
            samples = []
            while time.time() < at + AFTER_END:
                began = time.perf_counter()
                await asker.call("status", {"job": ref["id"]})
                samples.append(time.perf_counter() - began)
            return samples
        finally:
            harness.close_all([starter, asker])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", metavar="CHECKOUT", help="compare with this checkout first")
    parser.add_argument("--b", default=str(harness.ROOT), metavar="CHECKOUT")
    parser.add_argument("--jobs", type=int, default=400)
    opts = parser.parse_args()
    found = detect("jwbench-probe")
    if os.geteuid() != 0 or found.driver is None:
        say(f"skipped: needs root and cgroups ({found.reason})")
        return
    sides = [("A", opts.a), ("B", opts.b)] if opts.a else [("B", opts.b)]

    async def both(reactor: Any) -> list[list[float]]:
        return [await side(reactor, name, os.path.abspath(checkout), opts.jobs)
                for name, checkout in sides]

    for (name, checkout), samples in zip(sides, harness.run_on_reactor(both), strict=True):
        say(f"{name} ({checkout}): status while {opts.jobs} jobs end at once: "
            f"{len(samples)} replies, p50 {percentile(samples, 50) * 1e3:.2f} ms, "
            f"p99 {percentile(samples, 99) * 1e3:.2f} ms, max {max(samples) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
