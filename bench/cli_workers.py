"""``jwclient list --all-workers`` over 5 local daemons, against ``jwclient list`` of one
of them; issue 16's target: at most 1.5 times it.

How: 5 real daemons on 127.0.0.1, each with its own throwaway PKI and 100 ended jobs,
named in one configuration file.  ``jwclient --config F list --all-workers`` (five
connections at once, one thread each, rows merged) and ``jwclient --config F --worker w0
list`` are each run as a subprocess N times, alternately; medians of the wall times.
Output goes to /dev/null, so neither measures a terminal.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import harness
from harness import BIN, IDENTITY, Bench, Figure, Result, median, say

from jobworker.client import Client, start_params

WORKERS = 5
JOBS = 100
TIMEOUT = 30.0


def run(quick: bool) -> Result:
    count = 5 if quick else 15
    jobs = 20 if quick else JOBS
    result = Result("cli_workers", harness.how(__doc__))
    say(__doc__)
    say(f"  {WORKERS} daemons, {jobs} jobs each, {count} runs each")
    benches = [Bench(f"cli_workers{i}") for i in range(WORKERS)]
    with contextlib.ExitStack() as stack:
        # Started and stopped at once, a thread each: five in a row would take most of
        # the script's budget on a busy machine.
        stack.callback(_all, benches, lambda b: b.close() if b.tmp.exists() else None)
        _all(benches, lambda b: b.__enter__())
        config = benches[0].tmp / "client.toml"
        config.write_text("".join(
            f'[worker.w{i}]\nserver = "{b.address}"\npki = "{b.pki_dir}"\n'
            f'identity = "{IDENTITY}"\n' for i, b in enumerate(benches)))
        for b in benches:
            with Client(b.address, pki=str(b.pki_dir), identity=IDENTITY) as c:
                started = c.start_many([start_params("/bin/true")] * jobs)
                c.wait_many([r.id for r in started if hasattr(r, "id")])
        jw = [str(BIN / "jwclient"), "--config", str(config)]
        commands = {"one": [*jw, "--worker", "w0", "list"],
                    "all": [*jw, "list", "--all-workers"]}
        times: dict[str, list[float]] = {key: [] for key in commands}
        for argv in commands.values():  # unmeasured: caches warm
            _wall(argv)
        for _ in range(count):
            for key, argv in commands.items():
                times[key].append(_wall(argv))
    result.add(Figure(f"jwclient list --all-workers ({WORKERS} daemons), wall time",
                      median(times["all"]) * 1000, "ms", "jwclient list, one daemon",
                      median(times["one"]) * 1000, target="<= 1.5"))
    return result


def _all(benches: list[Bench], do: Callable[[Bench], object]) -> None:
    """``do`` to every bench at once; the first error, once all are done."""
    with ThreadPoolExecutor(len(benches)) as pool:
        for future in [pool.submit(do, b) for b in benches]:
            future.result()


def _wall(argv: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=TIMEOUT)
    return time.perf_counter() - began


if __name__ == "__main__":
    opts = harness.cli(__doc__)
    harness.finish(run(opts.quick), opts.json)
