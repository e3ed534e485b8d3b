"""Profile the daemon's start or status path with py-spy while clients load it.

Run: .venv/bin/python bench/profile.py start|status [--seconds 8] [--clients 4] [--top 25]

How: a real daemon (harness.Bench) is loaded by C clients sending ``start /bin/true`` or
``status`` of one job back to back; ``py-spy record`` samples the daemon (not this process)
at 1 kHz for the window and writes collapsed stacks.  Printed: the share of samples in
which each function is on the stack (inclusive) and on top of it (self), highest first,
and the request rate reached under the profiler (py-spy slows the daemon a little).
Needs py-spy (``pip install py-spy``) and permission to ptrace the daemon (root here).
Not part of run_all: its output is for reading, not a figure.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import harness
from harness import BIN, TRUE, Bench, say


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=("start", "status", "follow"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--window", type=int, default=1,
                        help="requests each client keeps in flight (start, status)")
    parser.add_argument("--keep", metavar="FILE", help="copy the collapsed stacks here")
    parser.add_argument("--client", action="store_true",
                        help="sample this process (the clients) instead of the daemon")
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the GIL: Python work, not syscalls")
    parser.add_argument("--daemon-env", action="append", default=[], metavar="K=V",
                        help="extra environment for the daemon (repeatable)")
    parser.add_argument("--daemon-arg", action="append", default=[], metavar="ARG",
                        help="extra twistd jobworker option, e.g. --daemon-arg=--store=memory")
    parser.add_argument("--perf", action="store_true",
                        help="sample with `perf record -e cpu-clock` instead (kernel time too)")
    parser.add_argument("--perf-sort", default="comm,dso,sym", help="perf report --sort keys")
    opts = parser.parse_args()
    if opts.perf:
        perf_main(opts)
        return
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")

    env = dict(e.split("=", 1) for e in opts.daemon_env)
    with Bench(f"profile-{opts.path}", opts.daemon_arg, daemon_env=env) as bench:
        out = bench.tmp / "stacks.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(os.getpid() if opts.client else bench.pid), "--rate", "1000", "--format", "raw",
             "--output", str(out), "--duration", str(int(opts.seconds + 1)), "--nonblocking",
             *(["--gil"] if opts.gil else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            rate = harness.run_on_reactor(
                lambda reactor: load(reactor, bench, opts.path, opts.clients, opts.seconds,
                                     opts.window))
            try:
                spy.wait(opts.seconds + 30)
            except subprocess.TimeoutExpired:
                os.killpg(spy.pid, signal.SIGINT)
                spy.wait(10)
        finally:
            if spy.poll() is None:
                os.killpg(spy.pid, signal.SIGKILL)
                spy.wait(10)
        if not out.exists():
            raise SystemExit(f"py-spy wrote nothing: {spy.stderr.read().decode() if spy.stderr else ''}")
        unit = "MiB/s per follower" if opts.path == "follow" else "requests/s"
        say(f"{opts.path}: {rate:.0f} {unit} with {opts.clients} clients under py-spy")
        report(out.read_text(), opts.top)
        if opts.keep:
            shutil.copy(out, opts.keep)


def perf_main(opts: argparse.Namespace) -> None:
    """Kernel and native frames too: where the daemon's system time goes."""
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("perf not found")
    env = dict(e.split("=", 1) for e in opts.daemon_env)
    with Bench(f"perf-{opts.path}", opts.daemon_arg, daemon_env=env) as bench:
        data = bench.tmp / "perf.data"
        rec = subprocess.Popen(
            [perf, "record", "-q", "-e", "cpu-clock", "-F", "2000", "-g", "-p", str(bench.pid),
             "-o", str(data), "--", "sleep", str(int(opts.seconds + 1))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            rate = harness.run_on_reactor(
                lambda reactor: load(reactor, bench, opts.path, opts.clients, opts.seconds,
                                     opts.window))
            rec.wait(opts.seconds + 30)
        finally:
            if rec.poll() is None:
                os.killpg(rec.pid, signal.SIGKILL)
                rec.wait(10)
        unit = "MiB/s per follower" if opts.path == "follow" else "requests/s"
        say(f"{opts.path}: {rate:.0f} {unit} with {opts.clients} clients under perf")
        out = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--stdio",
                              "--sort", opts.perf_sort, "-g", "none", "--percent-limit", "0.7"],
                             capture_output=True, text=True, timeout=120, check=False).stdout
        say("\n".join(line for line in out.splitlines() if line and not line.startswith("#")))


async def load(reactor: Any, bench: Bench, path: str, clients_n: int, seconds: float,
               window: int = 1) -> float:
    clients = await harness.connect(reactor, bench, clients_n)
    try:
        if path == "follow":
            return await follow_load(reactor, clients, seconds)
        if path == "start":
            method, params = "start", {"command": TRUE, "args": []}
        else:
            record = await clients[0].call("start", {"command": TRUE, "args": []})
            method, params = "status", {"job": record["id"]}
        done, elapsed = await harness.back_to_back(clients, method, params, seconds, window)
        return done / elapsed
    finally:
        harness.close_all(clients)


async def follow_load(reactor: Any, clients: list[Any], seconds: float) -> float:
    """Jobs writing 256 MiB, each followed by every client; returns MiB/s per client."""
    from twisted.internet.defer import Deferred, gatherResults

    mib, got = 256, [0]
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < deadline:
        record = await clients[0].call("start", {"command": "/bin/dd", "args": [
            "if=/dev/zero", "bs=1M", f"count={mib}", "status=none"]})

        def sink(chunk: bytes) -> None:
            got[0] += len(chunk)

        await gatherResults([Deferred.fromCoroutine(c.logs(record["id"], sink, follow=True))
                             for c in clients])
        os.unlink(os.path.join(record["log_dir"], "stdout.log"))
    return got[0] / len(clients) / (1 << 20) / (time.perf_counter() - began)


def report(collapsed: str, top: int) -> None:
    """Inclusive and self shares per function from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        if frames and "doPoll" in frames[-1]:
            frames.append("(idle in epoll)")
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        say("no samples")
        return
    say(f"\n{total} samples; inclusive share (function on the stack):")
    for frame, n in inclusive.most_common(top):
        say(f"  {100 * n / total:5.1f}%  {frame}")
    say("\nself share (function on top of the stack):")
    for frame, n in own.most_common(top):
        say(f"  {100 * n / total:5.1f}%  {frame}")


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: merge lines of one function."""
    name, _, where = frame.partition(" (")
    file = Path(where.rstrip(")").rsplit(":", 1)[0]).name if where else ""
    return f"{name} ({file})" if file else name


if __name__ == "__main__":
    main()
