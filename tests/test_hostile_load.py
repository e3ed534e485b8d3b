"""Hostile clients at scale, against a real daemon over real TLS on 127.0.0.1: many clients'
jobs with exact output and exit codes, followers of a job filling its stdout, and the
daemon's descriptors, threads and children back at baseline after thousands of jobs and
connections.  Each case has a soak version with its counts scaled up (``make soak``)."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted
from conftest import (
    Daemon,
    child_pids,
    fds_but_spares,
    open_fd_count,
    quick_and_soak,
    thread_count,
    until,
)
from test_follow import cpu_seconds, inotify_watches
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred

from jobworker.client.api import Client, connect
from jobworker.jobs import logpool
from jobworker.jobs.logs import JobLogs
from jobworker.wire.record import JobRecord

MiB = 1 << 20


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
    began, cpu = time.monotonic(), cpu_seconds(d.pid)
    try:
        results = await within(DeferredList(
            [Deferred.fromCoroutine(exact_jobs(c, who, range(i * per_client,
                                                             (i + 1) * per_client), 10))
             for i, (c, who) in enumerate(zip(clients, identities, strict=True))],
            fireOnOneErrback=True, consumeErrors=True), 22.5 * clients_n * per_client / 1000)
    finally:
        for c in clients:
            c.close()
    elapsed, cpu = time.monotonic() - began, cpu_seconds(d.pid) - cpu
    wrong = [line for _, lines in results for line in lines]
    assert wrong == [], f"{len(wrong)} jobs differ, first: {wrong[:5]}"
    jobs = clients_n * per_client
    print(f"{clients_n} clients x {per_client} jobs: {jobs} exact in {elapsed:.1f}s "
          f"({jobs / elapsed:.0f} jobs/s; daemon CPU {cpu * 1000 / jobs:.1f} ms a job)")
    assert d.tracebacks() == []


# -- followers of a job filling its stdout --------------------------------------------------

#: Writes the first $1 bytes of random.Random($2).randbytes to stdout as fast as it can in
#: pieces of 1 B to 512 KiB: the first $3 at once, the rest on SIGUSR1 (blocked first, so
#: that none is lost).
FILLER = r'''
import os, random, signal, sys
total, seed, head = map(int, sys.argv[1:])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
rng = random.Random(seed)
data = memoryview(rng.randbytes(total))
done = 0
while done < total:
    if done == head:
        signal.sigwait({signal.SIGUSR1})
    end = min(done + rng.randint(1, 512 * 1024), total)
    if done < head:
        end = min(end, head)
    while done < end:
        done += os.write(1, data[done:end])
'''
SEED = 2026


class InOrder:
    """A follow's sink: checks each chunk against the expected bytes at the offset where
    it lands, so bytes lost, repeated or out of order are caught where they happen."""

    def __init__(self, expected: bytes) -> None:
        self.expected = memoryview(expected)
        self.size = 0
        self.first_wrong: int | None = None

    def __call__(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if self.first_wrong is None and self.expected[self.size:end] != chunk:
            self.first_wrong = self.size
        self.size = end


def log_size(record: JobRecord) -> int:
    return os.path.getsize(JobLogs(record.log_dir).path("stdout"))


@quick_and_soak(quick=(10, 32), soak=(50, 128), soak_timeout=1800)
@pytest_twisted.ensureDeferred
async def test_followers_of_a_job_filling_its_stdout_get_every_byte_in_order(
        make_daemon: Any, tmp_path: Path, scale: tuple[int, int]) -> None:
    """A job writes 32 MiB to stdout as fast as it can while 10 followers (each on its own
    connection, as two identities) follow it live: each gets exactly those bytes, in
    order, and its follow ends once the job has ended, with the ended record."""
    followers_n, mib = scale
    total, head = mib * MiB, 64 * 1024
    expected = random.Random(SEED).randbytes(total)
    script = tmp_path / "filler.py"
    script.write_text(FILLER)
    d = make_daemon()
    control = await connect(reactor, d.config())
    clients = [await connect(reactor, d.config(("alice", "auditor")[i % 2]))
               for i in range(followers_n)]
    try:
        job = await control.start(sys.executable, [str(script), str(total), str(SEED),
                                                   str(head)])
        await until(lambda: log_size(job) == head, what="the job's first 64 KiB")
        sinks = [InOrder(expected) for _ in clients]
        follows = [Deferred.fromCoroutine(c.logs(job.id, sink, follow=True))
                   for c, sink in zip(clients, sinks, strict=True)]
        await until(lambda: all(s.size == head for s in sinks), 20.0,
                    what="every follower at the live end")
        began = time.monotonic()
        os.kill(job.pid, signal.SIGUSR1)  # type: ignore[arg-type]
        ended = JobRecord.from_wire(await within(control.call("wait", {"job": job.id}), 60.0))
        had_at_end = [s.size for s in sinks]
        # ~80 MiB/s over all followers here, with the test as their one reader: a margin.
        deadline = 60.0 + followers_n * mib / 25
        done = DeferredList(follows, fireOnOneErrback=True, consumeErrors=True)
        try:
            finals = await within(done, deadline)
        except Exception:
            raise AssertionError(f"follows not ended {deadline:.0f}s after the job: "
                                 f"{[s.size for s in sinks]} of {total} bytes") from None
        elapsed = time.monotonic() - began
    finally:
        for c in [control, *clients]:
            c.close()
    assert (ended.state, ended.exit_code) == ("exited", 0), ended
    assert [(s.size, s.first_wrong) for s in sinks] == [(total, None)] * followers_n
    for _, final in finals:  # each follow ended after the job, with its end
        record = JobRecord.from_wire(final["record"])
        assert final["offset"] == total
        assert (record.state, record.ended_at) == ("exited", ended.ended_at)
    print(f"{followers_n} followers x {mib} MiB in {elapsed:.2f}s; had "
          f"{min(had_at_end) / MiB:.1f}-{max(had_at_end) / MiB:.1f} MiB when the job ended")
    assert d.tracebacks() == []


# -- descriptors, threads and children back at baseline ---------------------------------------


@dataclass(frozen=True)
class Footprint:
    """What the daemon holds: descriptors (without the spare log files, counted apart),
    inotify watches, threads, and children."""

    fds: int
    spare_fds: int
    cgroup_fds: int
    watches: int
    threads: int
    children: int

    @classmethod
    def of(cls, pid: int) -> Footprint:
        fds = fds_but_spares(pid)
        cgroup_fds = sum(t.startswith("/sys/fs/cgroup/") for t in fd_targets(pid, all=True))
        return cls(fds, open_fd_count(pid) - fds - cgroup_fds, cgroup_fds,
                   inotify_watches(pid), thread_count(pid), len(child_pids(pid)))


def fd_targets(pid: int, all: bool = False) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return sorted(t for t in targets if all or "/logs/.spare/" not in t)


async def visit(d: Daemon, i: int) -> str:
    """Connection ``i``: one short job, then one of four ways to leave; returns the job."""
    client = await connect(reactor, d.config())
    way = i % 4
    if way == 0:  # a clean visit: start, wait, whoami, close
        record = await client.start("true")
        await client.call("wait", {"job": record.id})
        await client.call("whoami")
        client.close()
    elif way == 1:  # closes with a wait in flight
        record = await client.start("sh", ["-c", "exit 3"])
        client.call("wait", {"job": record.id}).addErrback(lambda _: None)
        client.close()
    elif way == 2:  # drops (RST) a follow waiting at the live end of a running job
        record = await client.start("sh", ["-c", "printf x; exec sleep 0.5"])
        first: Deferred[None] = Deferred()
        Deferred.fromCoroutine(client.logs(
            record.id, lambda _: first.called or first.callback(None), follow=True)
        ).addErrback(lambda _: None)
        await first
        client.protocol.transport.abortConnection()
    else:  # a start that fails (no such program), a status, then RST
        record = await client.start("jw-no-such-program")
        await client.call("status", {"job": record.id})
        client.protocol.transport.abortConnection()
    return record.id


@quick_and_soak(quick=2000, soak=10_000, soak_timeout=3600)
@pytest_twisted.ensureDeferred
async def test_jobs_and_connections_leave_descriptors_threads_and_children_at_baseline(
        make_daemon: Any, scale: int) -> None:
    """2,000 connections (16 at a time), each running a short job and leaving cleanly,
    with a wait or a follow in flight, or by reset: once every job has ended, the daemon
    holds the descriptors, threads and children it held before (the spare log files
    apart: the pool holds up to 64, refilled ahead of time)."""
    d = make_daemon()
    control = await connect(reactor, d.config())
    try:
        sockets = sum(t.startswith("socket:") for t in fd_targets(d.pid))  # and control's
        await bounded(8, 4, lambda i: visit(d, i))  # what is made once is made now
        await until(lambda: not child_pids(d.pid) and sum(
            t.startswith("socket:") for t in fd_targets(d.pid)) == sockets,
            what="the warm-up jobs and connections to be gone")
        before = Footprint.of(d.pid)
        before_targets = fd_targets(d.pid)
        began = time.monotonic()
        visits = await within(bounded(scale, 16, lambda i: visit(d, i)), 0.04 * scale)
        churned = time.monotonic() - began
        ids = [job_id for _, job_id in visits]
        # Every job has ended: a wait on each (200 at a time, under the in-flight cap).
        ended = await within(bounded(len(ids), 200, lambda i: control.call(
            "wait", {"job": ids[i]})), 60.0)
        records = [JobRecord.from_wire(r) for _, r in ended]
        try:
            await until(lambda: Footprint.of(d.pid).fds == before.fds, 30.0,
                        what="the daemon's descriptors back at baseline")
        except AssertionError:
            pass  # the assertions below say what is left
        after = Footprint.of(d.pid)
        after_targets = fd_targets(d.pid)
    finally:
        control.close()
    assert [(r.state, r.exit_code) for r in records] == [
        [("exited", 0), ("exited", 3), ("exited", 0), ("failed", None)][i % 4]
        for i in range(scale)]
    assert after.fds == before.fds, sorted(set(after_targets) - set(before_targets))
    assert after.watches == before.watches == 0
    # The reactor's thread pool keeps every worker it starts.  Its one user, the spare log
    # pool, runs one refill at a time, yet may queue the next while the worker that made
    # the last is still on its way back to the pool: a second worker, kept from then on.
    assert before.threads <= after.threads <= before.threads + 1
    assert after.children == before.children == 0
    assert after.spare_fds <= 2 * logpool.SIZE
    # The cgroup pool keeps ready cgroups' files open (refilled as it goes): no more
    # after 2,000 jobs than a pool's worth beyond what it held before them.
    assert after.cgroup_fds <= 2 * max(before.cgroup_fds, 1), (before, after)
    print(f"{scale} jobs and connections in {churned:.1f}s; before {before}, after {after}")
    assert d.tracebacks() == []
