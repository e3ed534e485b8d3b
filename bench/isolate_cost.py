"""What ``isolate`` costs a job: spawn-to-exit of ``/bin/true`` through the daemon's own
spawn path (``posix_spawn_job``), directly and through the nsinit helper for each set of
namespaces, as root.  The difference is the helper's Python start-up and the namespaces'
set-up, paid before the program runs.

Run: sudo .venv/bin/python bench/isolate_cost.py [N]   (N spawns per case, default 50)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from jobworker.jobs.credentials import Credentials
from jobworker.jobs.namespaces import helper_command
from jobworker.jobs.posix_spawn import posix_spawn_job

ENV = {"PATH": "/usr/bin:/bin"}
CREDS = Credentials(61999, 61999, (), "jw-bench", "/")


def once(executable: str, args: list[str], env: dict[str, str], fds: dict[int, int]) -> float:
    began = time.perf_counter()
    pid = posix_spawn_job(executable, args, env, "/", fds)
    _, status = os.waitpid(pid, 0)
    took = time.perf_counter() - began
    if status != 0:
        raise SystemExit(f"{args} ended with wait status {status}")
    return took * 1000


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root: the helper makes namespaces")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    null = os.open(os.devnull, os.O_RDWR)
    fds = {0: null, 1: null, 2: null}
    cases: dict[str, tuple[str, list[str], dict[str, str]]] = {
        "no isolate": ("/bin/true", ["true"], ENV)}
    for ns in (["mount"], ["net"], ["pid"], ["pid", "net", "mount"]):
        cases[",".join(ns)] = helper_command(ns, "/bin/true", ["true"], ENV, CREDS)
    print(f"spawn to exit of /bin/true, {n} runs each, load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    base = None
    for name, (exe, args, env) in cases.items():
        once(exe, args, env, fds)  # warm the page cache
        runs = sorted(once(exe, args, env, fds) for _ in range(n))
        median = statistics.median(runs)
        base = median if base is None else base
        print(f"  {name:16s} median {median:6.1f} ms  p90 {runs[int(n * 0.9) - 1]:6.1f} ms"
              f"  (+{median - base:.1f} ms)")


if __name__ == "__main__":
    main()
