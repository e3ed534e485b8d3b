"""Hostile clients at scale, against a real daemon over real TLS on 127.0.0.1: many clients'
jobs with exact output and exit codes.  Each case has a soak version with its counts scaled
up (``make soak``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest_twisted
from conftest import quick_and_soak
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred

from jobworker.client.api import Client, connect
from jobworker.wire.record import JobRecord


async def within(d: Deferred[Any], timeout: float) -> Any:
    """``d``'s result, or a failure once ``timeout`` seconds have passed."""
    d.addTimeout(timeout, reactor)
    return await d


def bounded(count: int, window: int, one: Callable[[int], Any]) -> Deferred[Any]:
    """Run ``one(0)`` .. ``one(count - 1)`` (coroutines or Deferreds), at most ``window``
    at once; fires with their results in order, or with the first failure."""
    limit = DeferredSemaphore(window)
    return DeferredList([limit.run(lambda i=i: ensureDeferred(one(i)))
                         for i in range(count)], fireOnOneErrback=True, consumeErrors=True)


# -- many clients, exact output ------------------------------------------------------------

#: stdout: $1 (a printf format of octal escapes), then $4 bytes of ``yes $5``; stderr: $2;
#: then exit $3, or SIGKILL itself when $3 is "kill".
EXACT_JOB = ('printf "$1"; if [ "$4" -gt 0 ]; then yes "$5" | head -c "$4"; fi; '
             'printf "$2" >&2; if [ "$3" = kill ]; then kill -KILL $$; fi; exit "$3"')


@dataclass(frozen=True)
class Expected:
    """What job number ``n`` is started with, and what it must leave."""

    args: list[str]
    stdout: bytes
    stderr: bytes
    exit_code: int | None
    signal: str | None


def escaped(data: bytes) -> str:
    """``data`` as a printf format: every byte an octal escape, NUL included."""
    return "".join(f"\\{b:03o}" for b in data)


def expected_job(n: int) -> Expected:
    """Job ``n``: bytes of its own on stdout and stderr (NUL and 0x80-0xff, so not UTF-8),
    every 50th over 300 KB (several log chunks); a third exit non-zero, every 97th is
    killed by SIGKILL."""
    out = b"out %d:" % n + bytes((n * 131 + i * 7) % 256 for i in range(8 + n % 56)) + b"\n"
    err = b"err %d:" % n + bytes((n * 29 + i * 253) % 256 for i in range(n % 41)) + b"\xff\0"
    big, token = (300_000 + n if n % 50 == 7 else 0), f"y{n}"
    line = token.encode() + b"\n"
    stdout = out + (line * (big // len(line) + 1))[:big]
    killed = n % 97 == 13
    code = None if killed else 0 if n % 3 else 1 + n % 255
    args = ["-c", EXACT_JOB, "sh", escaped(out), escaped(err),
            "kill" if killed else str(code), str(big), token]
    return Expected(args, stdout, err, code, "SIGKILL" if killed else None)


def difference(got: tuple[Any, ...], want: tuple[Any, ...], names: tuple[str, ...]) -> str:
    """The fields that differ; bytes by length and first differing offset."""
    out = []
    for name, g, w in zip(names, got, want, strict=True):
        if g == w:
            continue
        if isinstance(g, bytes) and isinstance(w, bytes):
            at = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b),
                      min(len(g), len(w)))
            out.append(f"{name}: {len(g)} bytes, expected {len(w)}, first difference at {at}")
        else:
            out.append(f"{name}: {g!r}, expected {w!r}")
    return "; ".join(out)


async def exact_jobs(client: Client, identity: str, numbers: range, window: int) -> list[str]:
    """Run jobs ``numbers`` on ``client``, ``window`` at a time: start, wait, fetch both
    logs; return how each job that differs from ``expected_job`` differs."""
    names = ("owner", "state", "exit_code", "signal", "stdout", "stderr", "stdout offset",
             "stderr offset")
    wrong: list[str] = []

    async def one(i: int) -> None:
        n = numbers[i]
        want = expected_job(n)
        started = await client.start("sh", want.args)
        ended = JobRecord.from_wire(await client.call("wait", {"job": started.id}))
        out, err = bytearray(), bytearray()
        out_end = await client.logs(started.id, out.extend, "stdout")
        err_end = await client.logs(started.id, err.extend, "stderr")
        got = (ended.owner, ended.state, ended.exit_code, ended.signal, bytes(out), bytes(err),
               out_end["offset"], err_end["offset"])
        expected = (identity, "exited", want.exit_code, want.signal, want.stdout, want.stderr,
                    len(want.stdout), len(want.stderr))
        if got != expected:
            wrong.append(f"job {n} ({started.id}): {difference(got, expected, names)}")

    await bounded(len(numbers), window, one)
    return wrong


@quick_and_soak(quick=(20, 200), soak=(50, 1000), soak_timeout=3600)
@pytest_twisted.ensureDeferred
async def test_many_clients_jobs_have_exact_output_and_exit_codes(
        make_daemon: Any, scale: tuple[int, int]) -> None:
    """20 clients, each on its own TLS connection, run 200 jobs each at once (start, wait,
    fetch stdout and stderr): every job's output (binary, some over several chunks) is
    byte for byte its own, and its exit code or signal is exact."""
    clients_n, per_client = scale
    d = make_daemon()
    identities = [("alice", "bob")[i % 2] for i in range(clients_n)]
    clients = [await connect(reactor, d.config(who)) for who in identities]
    began = time.monotonic()
    import os as _o
    def _cpu(pid):
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return ((int(f[11]) + int(f[12])) / _o.sysconf("SC_CLK_TCK"), (int(f[13]) + int(f[14])) / _o.sysconf("SC_CLK_TCK"))
    c0, t0 = _cpu(d.pid), time.process_time()
    try:
        results = await within(DeferredList(
            [Deferred.fromCoroutine(exact_jobs(c, who, range(i * per_client,
                                                             (i + 1) * per_client), 10))
             for i, (c, who) in enumerate(zip(clients, identities, strict=True))],
            fireOnOneErrback=True, consumeErrors=True), 22.5 * clients_n * per_client / 1000)
    finally:
        for c in clients:
            c.close()
    elapsed = time.monotonic() - began
    print("CPU daemon, children", _cpu(d.pid), c0, "test", time.process_time() - t0)
    wrong = [line for _, lines in results for line in lines]
    assert wrong == [], f"{len(wrong)} jobs differ, first: {wrong[:5]}"
    jobs = clients_n * per_client
    print(f"{clients_n} clients x {per_client} jobs: {jobs} exact in {elapsed:.1f}s "
          f"({jobs / elapsed:.0f} jobs/s)")
    assert d.tracebacks() == []
