"""Following a job's output: throughput for 1 and 10 followers of a job writing 1 GiB, and
the latency from a job's write to a follower receiving it.

How (throughput): the job is ``dd if=/dev/zero bs=1M count=1024 status=none``; right after
its ``start`` reply, F clients (one TLS connection each, in this process) send
``logs {"follow": true}`` from offset 0 and count the bytes until the final reply.  The
rate is F x 1 GiB / time from ``start`` to the last follower's final reply (every byte
checked to arrive).  Baseline, same run: ``cat`` of the same finished log file into a
pipe read by this process into one reused 1 MiB buffer (the fair peer of a follower: the bytes reach
another process); ``cat FILE > /dev/null`` is printed too for scale.  One follower: three
rounds, medians (the first round is usually the slowest: its job also writes into fresh
page cache while it is followed).
Target: one follower >= 0.5 x cat.

How (latency): a job writes a line holding ``time.monotonic_ns()`` every 5 ms (400 lines);
one follower parses each line as it arrives and records now - then.  Both ends read the
same CLOCK_MONOTONIC.  Target: p50 under 5 ms.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
from harness import Bench, Figure, Result, median, percentile, say

DD = "/bin/dd"
TIMEOUT = 180.0  # for one 1 GiB round, all followers
WRITER = ("import os, sys, time\n"
          "time.sleep(0.3)\n"
          "for _ in range(int(sys.argv[1])):\n"
          "    os.write(1, b'%d\\n' % time.monotonic_ns())\n"
          "    time.sleep(0.005)\n")


def run(quick: bool) -> Result:
    mib = 64 if quick else 1024
    lines = 100 if quick else 400
    result = Result("follow", harness.how(__doc__))
    say(__doc__)
    say(f"  {mib} MiB job, 1 and 10 followers; {lines} latency lines")

    with Bench("follow") as bench:
        m = harness.run_on_reactor(lambda r: measure(r, bench, mib, lines))
    for n in (1, 10):
        result.add(Figure(f"follow throughput, {n} follower{'s' if n > 1 else ''} (total)",
                          m[n], "MiB/s", "cat of the file into a pipe", m[f"cat{n}"],
                          ">= 0.5" if n == 1 else None))
    result.add(Figure("cat of the file to /dev/null (for scale)", m["devnull"], "MiB/s"))
    result.notes.append("one follower, each round (follower / cat into a pipe, MiB/s): " +
                        ", ".join(f"{f:.0f} / {c:.0f}" for f, c, _ in m["rounds1"]))
    lat = m["latency"]
    result.add(Figure("write-to-follower latency p50", percentile(lat, 50), "ms",
                      target="<= 5"))
    result.add(Figure("write-to-follower latency p99", percentile(lat, 99), "ms"))
    return result


async def measure(reactor: Any, bench: Bench, mib: int, lines: int) -> dict[Any, Any]:
    clients = await harness.connect(reactor, bench, 10)
    out: dict[Any, Any] = {}
    try:
        # One follower is the targeted figure: three rounds (each with its own cat
        # baseline), medians; ten followers once.
        for n, rounds in ((1, 1 if mib < 1024 else 3), (10, 1)):
            runs = [await throughput(reactor, clients[:n], mib) for _ in range(rounds)]
            out[n], out[f"cat{n}"], out["devnull"] = (median(r[i] for r in runs)
                                                      for i in range(3))
            out[f"rounds{n}"] = runs
        out["latency"] = await latency(reactor, clients[0], lines)
        return out
    finally:
        harness.close_all(clients)


async def throughput(reactor: Any, clients: list[Any], mib: int) -> tuple[float, float, float]:
    from twisted.internet.defer import Deferred, gatherResults

    size = mib << 20
    args = ["if=/dev/zero", "bs=1M", f"count={mib}", "status=none"]
    received = [0] * len(clients)

    async def follow(i: int, job: str) -> None:
        def sink(chunk: bytes) -> None:
            received[i] += len(chunk)

        await clients[i].logs(job, sink, follow=True)

    began = time.perf_counter()
    record = await clients[0].call("start", {"command": DD, "args": args})
    followers = gatherResults([Deferred.fromCoroutine(follow(i, record["id"]))
                               for i in range(len(clients))])
    await followers.addTimeout(TIMEOUT, reactor)
    took = time.perf_counter() - began
    if received != [size] * len(clients):
        raise RuntimeError(f"followers received {received}, expected {size} each")
    log = Path(record["log_dir"]) / "stdout.log"
    try:
        # Blocking on purpose: the followers are done, nothing else runs meanwhile.
        cat = [_cat_pipe(log, size) for _ in range(3)]
        devnull = [_cat_devnull(log) for _ in range(3)]
    finally:
        os.unlink(log)
    rate = len(clients) * mib / took
    say(f"  {len(clients):>2} follower(s): {took:.2f}s, {rate:.0f} MiB/s in total; "
        f"cat into a pipe {median(cat):.2f}s, cat > /dev/null {median(devnull):.2f}s")
    return rate, mib / median(cat), mib / median(devnull)


def _cat_pipe(path: Path, size: int) -> float:
    began = time.perf_counter()
    with subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE) as cat:
        assert cat.stdout is not None
        got = 0
        buf = memoryview(bytearray(1 << 20))  # reused: no allocation per read
        while n := cat.stdout.readinto(buf):  # type: ignore[attr-defined]
            got += n
        cat.wait(TIMEOUT)
    took = time.perf_counter() - began
    if got != size:
        raise RuntimeError(f"cat gave {got} bytes, expected {size}")
    return took


def _cat_devnull(path: Path) -> float:
    began = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True, timeout=TIMEOUT)
    return time.perf_counter() - began


async def latency(reactor: Any, client: Any, lines: int) -> list[float]:
    samples: list[float] = []
    partial = bytearray()

    def sink(chunk: bytes) -> None:
        now = time.monotonic_ns()
        partial.extend(chunk)
        *complete, rest = partial.split(b"\n")
        partial[:] = rest
        samples.extend((now - int(line)) / 1e6 for line in complete)

    record = await client.call("start", {"command": sys.executable,
                                         "args": ["-c", WRITER, str(lines)]})
    from twisted.internet.defer import Deferred

    following = Deferred.fromCoroutine(client.logs(record["id"], sink, follow=True))
    await following.addTimeout(60, reactor)
    if len(samples) != lines:
        raise RuntimeError(f"follower saw {len(samples)} lines, expected {lines}")
    return samples


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
