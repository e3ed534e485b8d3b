"""Metrics cost: start throughput of a daemon with ``--metrics`` against one without.

How: two real daemons from this checkout on 127.0.0.1, A plain and B with ``--metrics
tcp:0:interface=127.0.0.1``, each with its own client in this process sending ``start
/bin/true`` back to back, 4 in flight (enough to keep the daemon busy), in paired
windows that alternate A B, B A, ... (as bench/ab.py does) so a slow spell of the
machine falls on both sides.  Per window: starts per second and the daemon's CPU per
start.  Figures: the medians of the per-round B/A ratios.  Target: metrics cost under 5% of start throughput (ratio >= 0.95).  After
every B window, /metrics is fetched over HTTP (as Prometheus would, but far more often):
``jobworker_jobs_started_total`` and the start requests' histogram count must have moved
at every fetch, and by as much as each other (every start B answered spawned a job).
"""

from __future__ import annotations

import re
import statistics
import time
import urllib.request
from typing import Any

import harness
from ab import window
from harness import TRUE, Bench, Figure, Result, say

#: Starts kept in flight per client: enough to keep the daemon busy.
INFLIGHT = 4


def scrape(url: str) -> dict[str, float]:
    """The unlabelled and ``method="start"`` samples of one GET of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.labels or s.labels == {"method": "start"}:
                found[s.name] = s.value
    return found


def metrics_url(bench: Bench, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics\.listening host=\S+ port=(\d+)", bench.log())
        if m:
            return f"http://127.0.0.1:{m.group(1)}/metrics"
        time.sleep(0.02)  # outside any reactor: a plain poll of the log file
    raise RuntimeError(f"no metrics endpoint in the log:\n{bench.log()[-3000:]}")


async def measure(reactor: Any, a: Bench, b: Bench, url: str, rounds: int, seconds: float
                  ) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]],
                             list[dict[str, float]]]:
    (ca,) = await harness.connect(reactor, a)
    (cb,) = await harness.connect(reactor, b)
    params = {"command": TRUE, "args": []}
    results_a, results_b = [], []
    scrapes: list[dict[str, float]] = []
    try:
        for i in range(rounds):
            for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                if side == "A":
                    results_a.append(await window(a, [ca], "start", params, seconds, INFLIGHT))
                    continue
                if not scrapes:
                    scrapes.append(scrape(url))
                results_b.append(await window(b, [cb], "start", params, seconds, INFLIGHT))
                scrapes.append(scrape(url))  # blocking, between windows: B is idle
    finally:
        harness.close_all([ca, cb])
    return results_a, results_b, scrapes


def run(quick: bool) -> Result:
    rounds, seconds = (2, 0.2) if quick else (12, 0.5)
    result = Result("metrics_cost", harness.how(__doc__))
    say(__doc__)
    say(f"  {rounds} rounds of {seconds:g}s per side")
    with Bench("metrics-off") as a, \
            Bench("metrics-on", ["--metrics", "tcp:0:interface=127.0.0.1"]) as b:
        url = metrics_url(b)
        ra, rb, scrapes = harness.run_on_reactor(
            lambda reactor: measure(reactor, a, b, url, rounds, seconds))
    rate = statistics.median(y[0] / x[0] for x, y in zip(ra, rb, strict=True))
    cpu = statistics.median(y[1] / x[1] for x, y in zip(ra, rb, strict=True))
    result.add(Figure("start throughput with --metrics", statistics.median(r[0] for r in rb),
                      "starts/s", "same, without (paired windows)",
                      statistics.median(r[0] for r in ra), ">= 0.95", ratio=rate))
    result.add(Figure("  daemon CPU per start with --metrics",
                      statistics.median(r[1] for r in rb), "us", "same, without",
                      statistics.median(r[1] for r in ra), "<= 1.05", ratio=cpu))
    first, last = scrapes[0], scrapes[-1]
    started = last["jobworker_jobs_started_total"] - first["jobworker_jobs_started_total"]
    requests = (last["jobworker_rpc_duration_seconds_count"]
                - first["jobworker_rpc_duration_seconds_count"])
    moving = all(later["jobworker_jobs_started_total"]
                 > earlier["jobworker_jobs_started_total"]
                 for earlier, later in zip(scrapes, scrapes[1:], strict=False))
    say(f"  /metrics fetched {len(scrapes)} times: jobworker_jobs_started_total "
        f"{first['jobworker_jobs_started_total']:.0f} -> "
        f"{last['jobworker_jobs_started_total']:.0f}, start requests +{requests:.0f}, "
        f"moved at every fetch: {moving}")
    result.add(Figure("  jobs_started_total moved by, against start requests counted",
                      started, "jobs", "rpc_duration_seconds_count{method=start}", requests,
                      ">= 1.0"))
    if not moving:
        raise RuntimeError("jobworker_jobs_started_total did not move between fetches")
    result.series["metrics_scrapes"] = [s["jobworker_jobs_started_total"] for s in scrapes]
    return result


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
