"""Start rate with a cgroup per job against ``--no-cgroups``, in the same run.

Run: .venv/bin/python bench/cgroups.py [--clients 1] [--inflight 1] [--rounds 12]
         [--window 0.5]

How: two real daemons of this checkout (harness.Bench), A with ``--no-cgroups`` and B with
cgroups (its own ``--cgroup-root-name``), measured by ``ab.measure``: paired, alternating
windows of ``start /bin/true`` back to back.  Printed: medians and the median of the
per-round B/A ratios (the figure to quote; the target is >= 0.7).  Each B start renames
a spare cgroup in every hierarchy and moves the reactor thread in and out around
posix_spawn; the job's end adds a poll of cgroup.procs, four small reads for its usage,
and a batched rmdir in a worker thread.  Needs root and cgroups; prints why not otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics

import ab
import harness
from harness import Bench, say

from jobworker.jobs.cgroups import detect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("start", "status"), default="start")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=float, default=0.5)
    opts = parser.parse_args()
    found = detect("jwbench-probe")
    if os.geteuid() != 0 or found.driver is None:
        say(f"skipped: needs root and cgroups ({found.reason})")
        return
    say(f"A: --no-cgroups  B: cgroups {found.driver.version} "
        f"({','.join(found.driver.controllers)})  {opts.method}, {opts.clients} client(s) x "
        f"{opts.inflight} in flight, {opts.rounds} rounds of {opts.window:g}s each")
    with Bench("cg-a", ["--no-cgroups"]) as a, \
            Bench("cg-b", ["--cgroup-root-name", f"jwbench-{os.getpid()}"]) as b:
        results = harness.run_on_reactor(lambda reactor: ab.measure(reactor, a, b, opts))
    for i, label in enumerate(("requests/s", "daemon CPU us/request", "client CPU us/request")):
        med_a = statistics.median(r[i] for r in results["A"])
        med_b = statistics.median(r[i] for r in results["B"])
        paired = statistics.median(rb[i] / ra[i] for ra, rb in zip(results["A"], results["B"],
                                                                   strict=True))
        say(f"  {label:22s} A {med_a:10.1f}   B {med_b:10.1f}   B/A paired {paired:.3f}")


if __name__ == "__main__":
    main()
