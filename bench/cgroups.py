"""What cgroups cost a start: a cgroup per job against ``--no-cgroups``, and a start with
memory+cpu+pids limits against one without, each in the same run.

Run: .venv/bin/python bench/cgroups.py [--quick] [--json PATH] [--clients 1]
         [--inflight 1] [--rounds 12] [--window 0.5]

How: two real daemons of this checkout (harness.Bench), A with ``--no-cgroups`` and B with
cgroups (its own ``--cgroup-root-name``).  Paired, alternating windows (as ``bench/ab.py``):
``start /bin/true`` back to back on A, then on B, then B, A, ... (target: B/A >= 0.7); then
on B alone, windows of starts without limits alternating with windows of starts asking for
``memory`` 512 MiB, ``cpu`` 1 core and ``pids`` 64 (target: limited/unlimited >= 0.9).
Each figure is the median of the per-round ratios of the start rates; the daemon's CPU per
start (utime + stime, all its threads) is shown the same way.  Each B start renames a spare
cgroup in every hierarchy and moves the reactor thread in and out around posix_spawn; a
limited start also writes the limits and, on v1, joins cpu and pids cgroups of its own.
Needs root and cgroups; says why not otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import ab
import harness
from harness import TRUE, Bench, Figure, Result, say

from jobworker.jobs.cgroups import detect

#: What the limited starts ask for: above what /bin/true needs, so only their cost shows.
LIMITS = ab.LIMITS


async def paired(reactor: Any, sides: dict[str, tuple[Bench, dict[str, Any]]],
                 opts: argparse.Namespace) -> dict[str, list[tuple[float, float, float]]]:
    """``opts.rounds`` rounds of one window per side, in alternating order; each side is a
    daemon and the start it sends (two sides may share a daemon)."""
    clients = {id(b): await harness.connect(reactor, b, opts.clients)
               for b, _ in sides.values()}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in sides}
    names = list(sides)
    try:
        for i in range(opts.rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                bench, params = sides[name]
                results[name].append(await ab.window(bench, clients[id(bench)], "start",
                                                     params, opts.window, opts.inflight))
    finally:
        for c in clients.values():
            harness.close_all(c)
    return results


def figures(result: Result, label: str, base_label: str,
            runs: dict[str, list[tuple[float, float, float]]], target: str) -> None:
    base, other = runs["base"], runs["other"]
    for i, (what, unit, goal) in enumerate((("start rate", "starts/s", target),
                                            ("  daemon CPU per start", "us", None))):
        ratio = statistics.median(o[i] / b[i] for b, o in zip(base, other, strict=True))
        result.add(Figure(f"{what}, {label}", statistics.median(o[i] for o in other), unit,
                          base_label, statistics.median(b[i] for b in base), goal,
                          note="paired median ratio" if goal else "", ratio=ratio))


def run(opts: argparse.Namespace) -> Result:
    result = Result("cgroups", harness.how(__doc__))
    found = detect("jwbench-probe")
    if os.geteuid() != 0 or found.driver is None:
        say(f"skipped: needs root and cgroups ({found.reason})")
        result.notes.append(f"skipped: needs root and cgroups ({found.reason})")
        return result
    if opts.quick:
        opts.rounds = min(opts.rounds, 4)
    say(f"cgroups {found.driver.version} ({','.join(found.driver.controllers)}); "
        f"{opts.clients} client(s) x {opts.inflight} in flight, {opts.rounds} rounds of "
        f"{opts.window:g}s per side")
    plain = {"command": TRUE, "args": []}
    with Bench("cg-a", ["--no-cgroups"]) as a, \
            Bench("cg-b", ["--cgroup-root-name", f"jwbench-{os.getpid()}"]) as b:
        async def both(reactor: Any) -> tuple[Any, Any]:
            # One reactor run per process: both comparisons in it.
            return (await paired(reactor, {"base": (a, plain), "other": (b, plain)}, opts),
                    await paired(reactor, {"base": (b, plain),
                                           "other": (b, {**plain, **LIMITS})}, opts))

        per_job, limited = harness.run_on_reactor(both)
    figures(result, "a cgroup per job", "--no-cgroups", per_job, ">= 0.7")
    figures(result, "memory+cpu+pids limits", "cgroups, no limits", limited, ">= 0.9")
    return result


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=float, default=0.5)


if __name__ == "__main__":
    opts = harness.cli(__doc__ or "", options)
    harness.finish(run(opts), opts.json)
