"""Output capture: a job writing 1 GiB to stdout through jobworker, against the same command
with its stdout redirected by the shell straight to a file on the same disk.

How: ``dd if=/dev/zero bs=1M count=1024 status=none`` (1 GiB to stdout).  Through
jobworker: time from sending ``start`` to the reply of ``wait`` (the job has ended and its
stdout log holds the bytes).  Baseline, same run: ``/bin/sh -c 'exec dd ... > FILE'`` run
from this process, FILE in the same directory tree on the same disk as the daemon's state
dir.  One unmeasured warm-up write, then alternated (ABBA, a sync before each), several
rounds; each file is deleted as soon as it is measured.
Figure: MiB/s; target: jobworker >= 0.9 x the shell redirect.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import harness
from harness import Bench, Figure, Result, median, say

DD = "/bin/dd"
TIMEOUT = 120.0  # per 1 GiB write, either way


def run(quick: bool) -> Result:
    mib = 64 if quick else 1024
    rounds = 1 if quick else 4
    result = Result("capture", harness.how(__doc__))
    say(__doc__)
    say(f"  {mib} MiB per write, {rounds} rounds")

    with Bench("capture") as bench:
        ours, shell = harness.run_on_reactor(lambda r: measure(r, bench, mib, rounds))
    rate = mib / median(ours)
    base = mib / median(shell)
    result.add(Figure(f"output capture, {mib} MiB to stdout", rate, "MiB/s",
                      "shell redirect to a file", base, ">= 0.9"))
    result.series["capture"] = {"jobworker_s": ours, "shell_s": shell, "mib": mib}
    return result


async def measure(reactor: Any, bench: Bench, mib: int,
                  rounds: int) -> tuple[list[float], list[float]]:
    (client,) = await harness.connect(reactor, bench)
    args = ["if=/dev/zero", "bs=1M", f"count={mib}", "status=none"]
    scratch = bench.tmp / "shell"
    scratch.mkdir()
    ours: list[float] = []
    shell: list[float] = []
    try:
        # Unmeasured: the first big write of a run also pays for the guest's first touch of
        # that much page cache (seconds on a fresh VM); both sides then reuse it.
        _shell(scratch / "warm-up", args, mib)
        for i in range(rounds):
            # ABBA order, and a sync first, so neither side always inherits the other's
            # writeback or freed pages.
            for side in ("shell", "jobworker") if i % 2 == 0 else ("jobworker", "shell"):
                os.sync()
                if side == "shell":
                    shell.append(_shell(scratch / f"out{i}", args, mib))
                else:
                    ours.append(await _ours(reactor, client, args, mib))
            say(f"  round {i + 1}: shell {shell[-1]:.2f}s, jobworker {ours[-1]:.2f}s")
        return ours, shell
    finally:
        harness.close_all([client])


def _shell(target: Path, args: list[str], mib: int) -> float:
    """Blocking on purpose: nothing else runs on the reactor meanwhile."""
    began = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", f"exec {DD} {' '.join(args)} > {target}"],
                   check=True, timeout=TIMEOUT)
    took = time.perf_counter() - began
    _remove(target, mib)
    return took


async def _ours(reactor: Any, client: Any, args: list[str], mib: int) -> float:
    began = time.perf_counter()
    record = await client.call("start", {"command": DD, "args": args})
    ended = await client.call("wait", {"job": record["id"]}).addTimeout(TIMEOUT, reactor)
    took = time.perf_counter() - began
    if ended["exit_code"] != 0:
        raise RuntimeError(f"dd through jobworker ended {ended}")
    _remove(Path(ended["log_dir"]) / "stdout.log", mib)
    return took


def _remove(path: Path, mib: int) -> None:
    size = os.stat(path).st_size
    os.unlink(path)
    if size != mib << 20:
        raise RuntimeError(f"{path} held {size} bytes, expected {mib << 20}")


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
