"""How fast can the daemon start and reap a job?  Compares spawn paths one job at a time.

Run: .venv/bin/python bench/spawn_paths.py [--seconds 1.5] [--background 1000]

Each line is the rate of "start /bin/true, wait until it has been reaped, repeat" (so it
measures spawn + exit notification + reap, serially), over a fixed wall-clock window:

  bare posix_spawn+waitpid  os.posix_spawn and a blocking waitpid, no reactor: the floor.
  twisted spawnProcess      reactor.spawnProcess in the daemon's cwd (Twisted's posix_spawnp).
  twisted spawnProcess+path path= another directory: Twisted falls back to fork+exec.
  jobworker spawn           jobworker.jobs.process.spawn (posix_spawn, setsid, pidfd reaping),
                            cwd = the daemon's, then cwd = another directory; "fallback"
                            is its os.posix_spawn path (lists every open fd, fchdir trick)
                            used where glibc lacks posix_spawn_file_actions_addclosefrom_np.
  ... with N running        the same while N `sleep 600` children (started the same way)
                            are alive, which is where Twisted's reap-all-on-SIGCHLD hurts.

Children get /dev/null on 0, 1 and 2.  Background sleeps are ended with SIGKILL by pid
(process group) afterwards and reaped before the next measurement.  Bounded to well under a
minute with the defaults.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from jobworker.jobs import posix_spawn
from jobworker.jobs.process import spawn

TRUE = "/bin/true"
SLEEP = "/bin/sleep"


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


async def rate(seconds: float, one: Callable[[], Awaitable[None]]) -> tuple[float, int]:
    """Run ``one`` back to back for ``seconds``; returns (jobs per second, jobs)."""
    for _ in range(20):  # warm up lazily created fds and caches
        await one()
    count = 0
    began = time.perf_counter()
    deadline = began + seconds
    while time.perf_counter() < deadline:
        await one()
        count += 1
    return count / (time.perf_counter() - began), count


def report(label: str, result: tuple[float, int]) -> None:
    print(f"  {label:<46} {result[0]:8.0f} /s   ({result[1]} jobs)", flush=True)


async def main(reactor: Any, seconds: float, background: int) -> None:
    null = _devnull()
    elsewhere = tempfile.mkdtemp(prefix="jw-bench-")
    try:
        await _measure(reactor, seconds, background, null, elsewhere)
    finally:
        os.close(null)
        os.rmdir(elsewhere)


async def _measure(reactor: Any, seconds: float, background: int, null: int,
                   elsewhere: str) -> None:
    here = os.getcwd()
    fds = {0: null, 1: null, 2: null}
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {seconds}s per line, "
          f"glibc spawn path {'available' if posix_spawn._libc_spawn else 'unavailable'}",
          flush=True)

    async def bare() -> None:
        # Blocking on purpose: this line is the floor without any event loop.
        actions = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)]
        pid = os.posix_spawn(TRUE, [TRUE], {}, file_actions=actions)  # noqa: ASYNC221
        os.waitpid(pid, 0)  # noqa: ASYNC222

    def twisted_spawn(path: str | None) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            proto = _Ended()
            reactor.spawnProcess(proto, TRUE, [TRUE], {}, path=path, childFDs=fds)
            await proto.ended
        return one

    def jobworker_spawn(cwd: str, libc: bool = True) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            proto = _Ended()
            with _spawn_path(libc):
                spawn(reactor, proto, TRUE, [TRUE], {}, cwd, null, null)
            await proto.ended
        return one

    # The reactor's SIGCHLD handler would also run for every bare child: not part of it.
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        report("bare posix_spawn+waitpid", await rate(seconds, bare))
    finally:
        signal.signal(signal.SIGCHLD, previous)
    report("twisted spawnProcess (daemon cwd)", await rate(seconds, twisted_spawn(None)))
    report("twisted spawnProcess path=other dir (fork)",
           await rate(seconds, twisted_spawn(elsewhere)))
    report("jobworker spawn, cwd = daemon's", await rate(seconds, jobworker_spawn(here)))
    report("jobworker spawn, cwd = other dir", await rate(seconds, jobworker_spawn(elsewhere)))
    report("  fallback (os.posix_spawn+fchdir), other dir",
           await rate(seconds, jobworker_spawn(elsewhere, libc=False)))

    async def with_background(label: str, start_one: Callable[[_Ended], Any],
                              *measures: tuple[str, Callable[[], Awaitable[None]]]) -> None:
        began = time.perf_counter()
        protos = [_Ended() for _ in range(background)]
        pids = [start_one(p).pid for p in protos]
        took = time.perf_counter() - began
        print(f"  ({background} sleeps started via {label} in {took:.2f}s, "
              f"{background / took:.0f}/s)", flush=True)
        try:
            for name, measure in measures:
                report(f"{name}, {background} running", await rate(seconds, measure))
        finally:
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)  # jobworker jobs lead their group
                except ProcessLookupError:
                    os.kill(pid, signal.SIGKILL)  # Twisted's children share ours
            began = time.perf_counter()
            for p in protos:
                await p.ended
            print(f"  ({background} sleeps killed and reaped in "
                  f"{time.perf_counter() - began:.2f}s)", flush=True)

    await with_background(
        "jobworker spawn",
        lambda p: spawn(reactor, p, SLEEP, [SLEEP, "600"], {}, here, null, null),
        ("jobworker spawn, other dir", jobworker_spawn(elsewhere)),
        ("  fallback (os.posix_spawn+fchdir)", jobworker_spawn(elsewhere, libc=False)),
    )
    await with_background(
        "twisted spawnProcess",
        lambda p: reactor.spawnProcess(p, SLEEP, [SLEEP, "600"], {}, childFDs=fds),
        ("twisted spawnProcess (daemon cwd)", twisted_spawn(None)),
    )


@contextmanager
def _spawn_path(libc: bool) -> Iterator[None]:
    """Force jobworker.jobs.posix_spawn onto its os.posix_spawn fallback for a moment."""
    saved = posix_spawn._libc_spawn
    if not libc:
        posix_spawn._libc_spawn = None
    try:
        yield
    finally:
        posix_spawn._libc_spawn = saved


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="window per measurement")
    parser.add_argument("--background", type=int, default=1000, help="sleeps kept running")
    opts = parser.parse_args()
    from jobworker.jobs.rlimits import raise_nofile_limit

    raise_nofile_limit()
    task.react(main, (opts.seconds, opts.background))
