"""A/B two versions of the daemon with paired, alternating windows.

Run: .venv/bin/python bench/ab.py --a CHECKOUT [--b CHECKOUT] [--method start|status]
         [--limits] [--clients 1] [--inflight 1] [--rounds 12] [--window 0.5] [--env-b K=V ...]

How: two real daemons (harness.Bench) on 127.0.0.1, A started with PYTHONPATH=<--a> and
B with PYTHONPATH=<--b> (default: this checkout), so each runs that checkout's jobworker;
``--env-a``/``--env-b`` add environment for one side only.  Each daemon gets its own
clients in this process (this checkout's jobworker.client), sending ``start /bin/true`` or
``status`` of one ended job back to back, ``--inflight`` at a time per client.  Windows
alternate A B, B A, ... so a slow spell of the machine falls on both sides.  Per window:
replies per second, the daemon's CPU per request (utime + stime of /proc/PID/stat, all its
threads) and this process's CPU per request (the clients).  Printed: the medians of A and
of B, and the median of the per-round B/A ratios, which is the figure to quote.  Two
identical daemons (``--a .``) gave 0.97-1.02 for the rates here, 0.99-1.01 for CPU per
``start`` and up to 1.08 for CPU per ``status`` (CPU time comes in 10 ms ticks): smaller
differences than that need more rounds.

Not part of run_all: it compares two versions and measures neither against the machine.
How the commits of issue 6 measured their effect: ``git worktree add /tmp/base <commit>``,
then ``bench/ab.py --a /tmp/base``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import harness
from harness import TRUE, Bench, say

_HZ = os.sysconf("SC_CLK_TCK")
#: ``--limits``: what each start asks for (bench/cgroups.py's limited starts too): above
#: what /bin/true needs, so only their cost shows.
LIMITS = {"memory": 512 << 20, "cpu": 1.0, "pids": 64}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _HZ


async def window(bench: Bench, clients: list[Any], method: str, params: dict[str, Any],
                 seconds: float, inflight: int) -> tuple[float, float, float]:
    """(requests/s, daemon CPU us per request, client CPU us per request)."""
    from twisted.internet.defer import gatherResults

    await gatherResults([c.call(method, params) for c in clients for _ in range(3)])
    daemon, mine = cpu_seconds(bench.pid), time.process_time()
    done, elapsed = await harness.back_to_back(clients, method, params, seconds, inflight)
    n = max(done, 1)
    return (done / elapsed, (cpu_seconds(bench.pid) - daemon) / n * 1e6,
            (time.process_time() - mine) / n * 1e6)

async def measure(reactor: Any, a: Bench, b: Bench, opts: argparse.Namespace
                  ) -> dict[str, list[tuple[float, float, float]]]:
    sides = {"A": (a, await harness.connect(reactor, a, opts.clients)),
             "B": (b, await harness.connect(reactor, b, opts.clients))}
    params: dict[str, dict[str, Any]] = {}
    for name, (_, clients) in sides.items():
        params[name] = {"command": TRUE, "args": []}
        if opts.limits:
            params[name].update(LIMITS)
        if opts.method == "status":
            record = await clients[0].call("start", params[name])
            params[name] = {"job": record["id"]}
    results: dict[str, list[tuple[float, float, float]]] = {"A": [], "B": []}
    try:
        for i in range(opts.rounds):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                bench, clients = sides[name]
                results[name].append(await window(bench, clients, opts.method, params[name],
                                                  opts.window, opts.inflight))
    finally:
        for _, clients in sides.values():
            harness.close_all(clients)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, metavar="CHECKOUT")
    parser.add_argument("--b", default=str(harness.ROOT), metavar="CHECKOUT")
    parser.add_argument("--env-a", action="append", default=[], metavar="K=V")
    parser.add_argument("--env-b", action="append", default=[], metavar="K=V")
    parser.add_argument("--method", choices=("start", "status"), default="start")
    parser.add_argument("--limits", action="store_true",
                        help="starts ask for memory+cpu+pids limits (as bench/cgroups.py's)")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=float, default=0.5)
    opts = parser.parse_args()

    def env(checkout: str, extra: list[str]) -> dict[str, str]:
        return {"PYTHONPATH": os.path.abspath(checkout), **dict(e.split("=", 1) for e in extra)}

    say(f"A: {opts.a}  B: {opts.b}  {opts.method}, {opts.clients} client(s) x "
        f"{opts.inflight} in flight, {opts.rounds} rounds of {opts.window:g}s each")
    with Bench("ab-a", daemon_env=env(opts.a, opts.env_a)) as a, \
            Bench("ab-b", daemon_env=env(opts.b, opts.env_b)) as b:
        results = harness.run_on_reactor(lambda reactor: measure(reactor, a, b, opts))
    for i, label in enumerate(("requests/s", "daemon CPU us/request", "client CPU us/request")):
        med_a = statistics.median(r[i] for r in results["A"])
        med_b = statistics.median(r[i] for r in results["B"])
        paired = statistics.median(rb[i] / ra[i] for ra, rb in zip(results["A"], results["B"],
                                                                   strict=True))
        say(f"  {label:22s} A {med_a:10.1f}   B {med_b:10.1f}   B/A paired {paired:.3f}")


if __name__ == "__main__":
    main()
