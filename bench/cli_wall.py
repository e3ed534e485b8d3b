"""``jwclient whoami`` and ``jwclient status`` wall time: one whole command (interpreter
start-up, imports, TLS handshake, hello, the call, printing), against ``python -c pass``;
issue 16's target: at most 5 times it.

How: ``jwclient whoami`` and ``jwclient status JOB`` are each run as a subprocess N times
against a real daemon, and ``python -c pass`` (the same interpreter as jwclient's) N
times, alternately; medians of the wall times.  Run as installed: with bytecode caches written (PYTHONDONTWRITEBYTECODE
is dropped from the children's environment and one unmeasured run of each comes first).
Also timed the same way: ``python -c "import jobworker.client.commands"`` (what
jwclient imports before it connects), to split import time from the rest.  The ten
slowest imports come from ``python -X importtime``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import harness
from harness import Bench, Figure, Result, median, say

TIMEOUT = 30.0


def run(quick: bool) -> Result:
    count = 5 if quick else 20
    result = Result("cli_wall", harness.how(__doc__))
    say(__doc__)
    say(f"  {count} runs each")

    with Bench("cli_wall") as bench:
        started = subprocess.run(bench.jwclient_argv("start", "/bin/true"), check=True,
                                 capture_output=True, text=True, timeout=TIMEOUT)
        job = started.stdout.strip()
        commands = {
            "bare": [sys.executable, "-c", "pass"],
            "whoami": bench.jwclient_argv("whoami"),
            "status": bench.jwclient_argv("status", job),
            "imports": [sys.executable, "-c", "import jobworker.client.commands"],
        }
        times: dict[str, list[float]] = {key: [] for key in commands}
        for argv in commands.values():  # unmeasured: writes the bytecode caches
            _wall(argv)
        for _ in range(count):
            for key, argv in commands.items():
                times[key].append(_wall(argv))
    bare = median(times["bare"]) * 1000
    for key in ("whoami", "status"):
        result.add(Figure(f"jwclient {key}, wall time", median(times[key]) * 1000, "ms",
                          "python -c pass", bare, target="<= 5"))
    result.add(Figure("  of which imports (import jobworker.client.commands)",
                      median(times["imports"]) * 1000, "ms", "python -c pass", bare))
    slowest = import_times()
    result.notes.append("largest imports under jobworker.client.commands (cumulative us): " +
                        ", ".join(f"{name.strip()} {us}" for us, name in slowest))
    say("  largest imports under jobworker.client.commands (cumulative, us, indented = nested):")
    for us, name in slowest:
        say(f"    {us:>8}  {name}")
    return result


#: Installed Python packages have their bytecode compiled; a sandbox may say otherwise.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(argv: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=TIMEOUT, env=ENV)
    return time.perf_counter() - began


def import_times(top: int = 10) -> list[tuple[int, str]]:
    """The largest cumulative import times under jobworker.client.commands, two levels deep."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import jobworker.client.commands"],
                         capture_output=True, text=True, timeout=TIMEOUT, env=ENV,
                         check=False).stderr
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip())) // 2
            if 1 <= depth <= 2:
                rows.append((int(parts[1]), "  " * (depth - 1) + name.strip()))
    return sorted(rows, reverse=True)[:top]


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
