"""Following a job's output live: FileWatcher and LogStream on fakes, then byte-exact follows,
many followers, resume, backpressure and clean-up against a real daemon and real jwclient."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_twisted
from conftest import BIN, Daemon, fds_but_cgroups, until
from OpenSSL import crypto
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.python.failure import Failure

from jobworker import PROTOCOL_VERSION, pki
from jobworker.client.api import Client, connect
from jobworker.daemon.authz import Authorizer
from jobworker.daemon.connection import RPCServerProtocol
from jobworker.daemon.follow import CHUNK_SIZE
from jobworker.daemon.server import RPCServer
from jobworker.daemon.watcher import POLL_INTERVAL, FileWatcher
from jobworker.jobs.logs import JobLogs, LogStore
from jobworker.jobs.manager import JobManager
from jobworker.testing import ProcessReactor, SlowPeer
from jobworker.wire.errors import ConnectionLost
from jobworker.wire.record import JobRecord

# Last resort if a deadline below fails to fire; every wait has its own.
pytestmark = pytest.mark.timeout(120, method="thread")

MiB = 1024 * 1024
WAIT = 20.0  # deadline for anything that should take well under a second

# A job that writes seeded pseudo-random bytes in random pieces, optionally pausing at
# random; after --hold stdout bytes it waits for SIGUSR1 (blocked before --ready is created,
# so no signal is lost).  The sha256 of each stream goes to --digest at the end.
WRITER = r'''
import argparse, hashlib, json, os, random, signal, time

p = argparse.ArgumentParser()
p.add_argument("--stdout", type=int, default=0)
p.add_argument("--stderr", type=int, default=0)
p.add_argument("--hold", type=int, default=-1)
p.add_argument("--piece", type=int, default=1 << 20)
p.add_argument("--pause", type=float, default=0.0)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--digest", required=True)
p.add_argument("--ready", required=True)
a = p.parse_args()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
open(a.ready, "w").close()
rng = random.Random(a.seed)
digests = {}
for fd, name, total in ((1, "stdout", a.stdout), (2, "stderr", a.stderr)):
    h, done = hashlib.sha256(), 0
    while True:
        if fd == 1 and done == a.hold:
            signal.sigwait({signal.SIGUSR1})
        if done == total:
            break
        n = min(rng.randint(1, a.piece), total - done)
        if fd == 1 and done < a.hold:
            n = min(n, a.hold - done)
        data = memoryview(rng.randbytes(n))
        h.update(data)
        done += n
        while data:
            data = data[os.write(fd, data):]
        if a.pause and rng.random() < 0.2:
            time.sleep(rng.uniform(0, a.pause))
    digests[name] = h.hexdigest()
with open(a.digest + ".tmp", "w") as f:
    json.dump(digests, f)
os.rename(a.digest + ".tmp", a.digest)
'''


# -- helpers ---------------------------------------------------------------------------------


async def within(d: Deferred[Any], timeout: float = WAIT) -> Any:
    d.addTimeout(timeout, reactor)
    return await d


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def fd_count(pid: int) -> int:
    return fds_but_cgroups(pid)


def inotify_watches(pid: int) -> int:
    """The inotify watches ``pid`` holds, over all its inotify descriptors."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except FileNotFoundError:  # closed while we looked
            continue
    return count


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Hasher:
    """A ``Client.logs`` sink that keeps a running hash and a byte count, not the bytes."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.h.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class Writer:
    """Starts the WRITER job and knows where its logs and digests are."""

    def __init__(self, script: Path, tmp: Path) -> None:
        self.script = script
        self.tmp = tmp
        self.n = 0

    async def start(self, client: Client, **options: Any) -> tuple[JobRecord, Path]:
        """Start it; return once it is ready for SIGUSR1, with where its digests will be."""
        self.n += 1
        digest = self.tmp / f"digest{self.n}.json"
        ready = self.tmp / f"ready{self.n}"
        args = [str(self.script), "--digest", str(digest), "--ready", str(ready)]
        for key, value in options.items():
            args += [f"--{key}", str(value)]
        record = await client.start(sys.executable, args)
        assert record.state == "running", record
        await until(ready.exists, what="the writer job to start")
        return record, digest


@pytest.fixture
def writer(tmp_path: Path) -> Writer:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return Writer(script, tmp_path)


def log_size(record: JobRecord, stream: str = "stdout") -> int:
    return os.path.getsize(JobLogs(record.log_dir).path(stream))


def digests(path: Path) -> dict[str, str]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


class Follower:
    """A real ``jwclient logs -f`` process, its output going to a file."""

    def __init__(self, daemon: Daemon, out: Path, *args: str) -> None:
        self.out = out
        self.err = out.with_suffix(".err")
        cmd = [str(BIN / "jwclient"), "--server", daemon.address, "--pki", str(daemon.pki.dir),
               "--identity", "alice", "logs", "-f", *args]
        with open(self.out, "wb") as stdout, open(self.err, "wb") as stderr:
            self.proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr,
                                         stdin=subprocess.DEVNULL)

    def size(self) -> int:
        return os.path.getsize(self.out)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def followers() -> Iterator[list[Follower]]:
    """Every Follower a test starts goes here and is killed at the end if still running."""
    started: list[Follower] = []
    yield started
    for f in started:
        f.kill()


# -- FileWatcher ------------------------------------------------------------------------------


def test_poll_fallback_wakes_once_per_interval_and_stops_with_the_last_watch(
        tmp_path: Path) -> None:
    """Without inotify, watchers are called once per poll interval, never more often,
    and the poll timer is gone once the last watch is removed."""
    clock = Clock()
    watcher = FileWatcher(clock, use_inotify=False)
    assert watcher.mode == "poll"
    calls: list[str] = []
    a = watcher.watch(str(tmp_path / "a"), lambda: calls.append("a1"))
    a2 = watcher.watch(str(tmp_path / "a"), lambda: calls.append("a2"))
    b = watcher.watch(str(tmp_path / "b"), lambda: calls.append("b"))
    assert calls == []
    clock.advance(POLL_INTERVAL * 0.9)
    assert calls == []
    clock.advance(POLL_INTERVAL * 0.1)
    assert sorted(calls) == ["a1", "a2", "b"]
    for _ in range(10):
        clock.advance(POLL_INTERVAL)
    assert len(calls) == 3 * 11
    a()
    a()  # idempotent
    b()
    calls.clear()
    clock.advance(POLL_INTERVAL)
    assert calls == ["a2"]
    a2()
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_inotify_wakes_a_watcher_on_growth_with_one_watch_per_file(
        tmp_path: Path) -> None:
    """With inotify, appending to a watched file calls its watchers; followers of one file
    share one kernel watch, which is removed with the last of them."""
    watcher = FileWatcher(reactor)
    try:
        assert watcher.mode == "inotify"
        before = inotify_watches(os.getpid())
        path = tmp_path / "log"
        path.write_bytes(b"")
        woke: Deferred[None] = Deferred()
        stop1 = watcher.watch(str(path), lambda: woke.called or woke.callback(None))
        stop2 = watcher.watch(str(path), lambda: None)
        assert inotify_watches(os.getpid()) == before + 1
        with open(path, "ab") as f:
            f.write(b"more")
        await within(woke, 5.0)
        stop1()
        assert inotify_watches(os.getpid()) == before + 1
        stop2()
        assert inotify_watches(os.getpid()) == before
    finally:
        watcher.close()


# -- LogStream behind the real server protocol, on fakes --------------------------------------


def frame(value: Any) -> bytes:
    payload = msgpack.packb(value, use_bin_type=True)
    return struct.pack("!I", len(payload)) + payload


@pytest.fixture(scope="module")
def alice_cert() -> crypto.X509:
    ca_key, ca_cert = pki.make_ca()
    _, cert = pki.make_client_cert(ca_key, ca_cert, "alice", role="user")
    return crypto.X509.from_cryptography(cert)


class Rig:
    """A JobManager on fake processes, an RPCServer with the poll FileWatcher on the same
    fake clock, and one connection to it over a SlowPeer.  Job output is written by the test."""

    def __init__(self, tmp: Path, cert: crypto.X509) -> None:
        self.reactor = ProcessReactor()
        self.manager = JobManager(self.reactor, LogStore(str(tmp / "logs")),
                                  killpg=self.reactor.killpg)
        self.watcher = FileWatcher(self.reactor, use_inotify=False)
        self.server = RPCServer(self.reactor, self.manager, Authorizer(),
                                follower=self.watcher)
        self.proto: RPCServerProtocol = self.server.buildProtocol(None)
        self.wire = SlowPeer(cert)
        self.proto.makeConnection(self.wire)
        self.proto.handshakeCompleted()
        self.proto.dataReceived(frame({"id": 0, "method": "hello",
                                       "params": {"version": PROTOCOL_VERSION}}))
        assert self.wire.drain()[0]["result"]["version"] == PROTOCOL_VERSION
        self.job = self.manager.start("alice", "sleep", ["60"])
        self.next_id = 1

    def append(self, data: bytes, stream: str = "stdout") -> None:
        with open(JobLogs(self.job.log_dir).path(stream), "ab") as f:
            f.write(data)

    def logs(self, **params: Any) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.proto.dataReceived(frame({"id": rid, "method": "logs",
                                       "params": {"job": self.job.id, **params}}))
        return rid

    def end(self, code: int) -> None:
        self.reactor.process(self.job.pid).exit(code)

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.reactor.advance(POLL_INTERVAL)


@pytest.fixture
def rig(tmp_path: Path, alice_cert: crypto.X509) -> Rig:
    return Rig(tmp_path, alice_cert)


def polls(clock: Clock) -> int:
    """How many poll timers (LoopingCalls) are scheduled on ``clock``."""
    return sum(1 for call in clock.getDelayedCalls()
               if isinstance(call.func, LoopingCall))


def received(frames: list[Any], rid: int) -> tuple[bytes, dict[str, Any] | None]:
    """The bytes of ``rid``'s chunks, and its final reply if it came."""
    data = b"".join(f["chunk"] for f in frames if f["id"] == rid and "chunk" in f)
    final = [f for f in frames if f["id"] == rid and "chunk" not in f]
    assert len(final) <= 1
    return data, final[0] if final else None


def test_follow_streams_growth_and_ends_with_the_final_record(rig: Rig) -> None:
    """A follower gets what is there, then each growth on the next poll, and a final
    reply with the end offset and the job's final record once the job has ended."""
    rig.append(b"hello ")
    rid = rig.logs(follow=True)
    assert received(rig.wire.drain(), rid) == (b"hello ", None)
    rig.append(b"world")
    assert rig.wire.drain() == []  # nothing until the watcher fires
    rig.tick()
    assert received(rig.wire.drain(), rid) == (b"world", None)
    rig.tick(5)
    assert rig.wire.drain() == []
    rig.append(b"!")
    rig.end(3)
    data, final = received(rig.wire.drain(), rid)
    assert data == b"!"
    assert final is not None and final["result"]["offset"] == 12
    record = final["result"]["record"]
    assert (record["state"], record["exit_code"], record["signal"]) == ("exited", 3, None)
    assert polls(rig.reactor) == 0  # the poll stopped with the last follower


def test_follow_from_an_offset_and_of_an_ended_job(rig: Rig) -> None:
    """``offset`` skips exactly that many bytes; following an ended job sends the rest and
    finishes at once."""
    rig.append(b"0123456789")
    rig.end(0)
    rid = rig.logs(follow=True, offset=4)
    data, final = received(rig.wire.drain(), rid)
    assert data == b"456789" and final is not None and final["result"]["offset"] == 10


def test_a_paused_connection_reads_nothing_and_then_one_chunk_per_resume(rig: Rig) -> None:
    """While the peer does not read, the stream reads nothing more however much the file
    grows; each resume sends one chunk; every byte arrives, in order."""
    content = os.urandom(4 * MiB + 123)
    rig.append(content[:MiB])
    rid = rig.logs(follow=True)
    assert rig.wire.producer_paused
    sent = rig.wire.unread
    rig.append(content[MiB:])
    rig.tick(50)
    rig.end(0)
    assert rig.wire.unread == sent  # paused: neither growth nor the end made it read
    frames: list[Any] = []
    for _ in range(100):
        new = rig.wire.drain()
        assert len([f for f in new if "chunk" in f]) <= 1
        frames += new
        if received(frames, rid)[1] is not None:
            break
    data, final = received(frames, rid)
    assert data == content and final is not None
    assert rig.wire.peak < rig.wire.limit + CHUNK_SIZE + 1024


def test_two_streams_on_one_paused_connection_stay_bounded(rig: Rig) -> None:
    """stdout and stderr followed on one connection (``logs --both``, ``run``): after a
    resume each stream sends at most one chunk, even though the transport passes on only
    the first pause; the daemon never holds a whole file."""
    out, err = os.urandom(4 * MiB), os.urandom(4 * MiB)
    rig.append(out)
    rig.append(err, "stderr")
    rig.end(0)
    r_out = rig.logs(follow=True)
    r_err = rig.logs(follow=True, stream="stderr")
    frames: list[Any] = []
    for _ in range(200):
        frames += rig.wire.drain()
        if received(frames, r_out)[1] is not None and received(frames, r_err)[1] is not None:
            break
    assert received(frames, r_out)[0] == out
    assert received(frames, r_err)[0] == err
    assert rig.wire.peak < rig.wire.limit + 2 * (CHUNK_SIZE + 1024)


def test_losing_the_connection_closes_the_file_and_the_watch(rig: Rig) -> None:
    """A follower whose connection drops, paused mid-stream or idle at the live end,
    frees its log descriptor and its watch at once."""
    rig.append(os.urandom(2 * MiB))
    fds = fd_count(os.getpid())
    # The idle one first: once a stream fills the transport, the connection takes no
    # further request until its peer reads.
    rig.logs(follow=True, stream="stderr")  # at the live end of an empty file
    rig.logs(follow=True)  # paused mid-stream
    assert fd_count(os.getpid()) == fds + 2
    assert polls(rig.reactor) == 1
    rig.proto.connectionLost(Failure(ConnectionDone()))
    assert fd_count(os.getpid()) == fds
    assert polls(rig.reactor) == 0
    rig.end(0)  # the job ending later finds nobody to wake


# -- against a real daemon, with real jwclient --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_jwclient_follows_50_mib_written_with_random_pauses_byte_exact(
        daemon: Daemon, writer: Writer, followers: list[Follower], tmp_path: Path) -> None:
    """``jwclient logs -f`` receives exactly the 50 MiB a job writes in random pieces with
    random pauses while it follows, then exits 0 when the job ends."""
    client = await connect(reactor, daemon.config())
    try:
        head = MiB
        job, digest = await writer.start(client, stdout=50 * MiB, hold=head, piece=512 * 1024,
                                         pause=0.02, seed=50)
        await until(lambda: log_size(job) == head, what="the job's first MiB")
        follower = Follower(daemon, tmp_path / "out", job.id)
        followers.append(follower)
        await until(lambda: follower.size() == head, what="the follower to catch up")
        started = time.monotonic()
        os.kill(job.pid, signal.SIGUSR1)
        await until(follower.done, 60.0, what="jwclient to exit")
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert follower.proc.returncode == 0, follower.err.read_text()
    assert follower.size() == 50 * MiB
    assert file_sha256(follower.out) == digests(digest)["stdout"]
    print(f"followed 49 MiB live in {elapsed:.2f}s")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_twenty_followers_early_late_and_after_the_end_get_identical_bytes(
        daemon: Daemon, writer: Writer, followers: list[Follower], tmp_path: Path) -> None:
    """20 ``jwclient logs -f`` on one job: 10 from the start, 5 joining after 90% of the
    output, 5 after the job has ended; all get the complete, identical byte sequence."""
    total, hold = 8 * MiB, 8 * MiB * 9 // 10
    client = await connect(reactor, daemon.config())
    try:
        job, digest = await writer.start(client, stdout=total, hold=hold, piece=256 * 1024,
                                         pause=0.01, seed=20)
        followers += [Follower(daemon, tmp_path / f"early{i}", job.id) for i in range(10)]
        await until(lambda: log_size(job) == hold, what="90% of the output")
        followers += [Follower(daemon, tmp_path / f"late{i}", job.id) for i in range(5)]
        # All 15 are live when the rest comes: the early ones may have joined late too.
        # 15 jwclient processes start and read 7.2 MiB each: ~5 s of CPU on 2 cores,
        # more than the default 10 s when other suites share the machine.
        await until(lambda: all(f.size() == hold for f in followers), 60.0,
                    what="the early and late followers to catch up")
        os.kill(job.pid, signal.SIGUSR1)
        ended = JobRecord.from_wire(await within(client.call("wait", {"job": job.id})))
        assert ended.exit_code == 0
        followers += [Follower(daemon, tmp_path / f"after{i}", job.id) for i in range(5)]
        await until(lambda: all(f.done() for f in followers), 60.0,
                    what="all 20 followers to exit")
    finally:
        client.close()
    expected = digests(digest)["stdout"]
    for f in followers:
        assert f.proc.returncode == 0, (f.out.name, f.err.read_text())
        assert (f.size(), file_sha256(f.out)) == (total, expected), f.out.name
    assert daemon.tracebacks() == []


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest_twisted.ensureDeferred
async def test_followers_waiting_at_the_live_end_cost_the_daemon_no_cpu(
        daemon: Daemon, writer: Writer) -> None:
    """Five followers caught up with a job that has gone quiet sleep in the daemon: it
    spends under 0.1 s of CPU in a second (no busy loop), and wakes them on new output."""
    clients = [await connect(reactor, daemon.config()) for _ in range(5)]
    try:
        job, digest = await writer.start(clients[0], stdout=2 * MiB, hold=MiB, seed=5)
        await until(lambda: log_size(job) == MiB, what="the first MiB")
        sinks = [Hasher() for _ in clients]
        follows = [Deferred.fromCoroutine(c.logs(job.id, s, follow=True))
                   for c, s in zip(clients, sinks, strict=True)]
        await until(lambda: all(s.size == MiB for s in sinks), what="followers to catch up")
        before = cpu_seconds(daemon.pid)
        await deferLater(reactor, 1.0, lambda: None)  # the interval measured, not a sync
        assert cpu_seconds(daemon.pid) - before < 0.1
        os.kill(job.pid, signal.SIGUSR1)
        await within(DeferredList(follows, fireOnOneErrback=True, consumeErrors=True))
    finally:
        for c in clients:
            c.close()
    assert {s.hexdigest() for s in sinks} == {digests(digest)["stdout"]}


@pytest_twisted.ensureDeferred
async def test_resume_from_an_offset_has_no_gap_and_no_duplicate(
        daemon: Daemon, writer: Writer, followers: list[Follower], tmp_path: Path) -> None:
    """Resuming with ``logs -f --offset N`` at the offset a previous read ended on, or at
    any byte, continues exactly there through the job's end."""
    client = await connect(reactor, daemon.config())
    try:
        hold = 3 * MiB + 17
        job, digest = await writer.start(client, stdout=6 * MiB + 5, hold=hold, seed=4)
        await until(lambda: log_size(job) == hold, what="the first part")
        first = bytearray()
        reply = await within(Deferred.fromCoroutine(client.logs(job.id, first.extend)))
        assert reply["offset"] == len(first) == hold
        middle = 1_234_567
        resumed = Follower(daemon, tmp_path / "resumed", "--offset", str(reply["offset"]),
                           job.id)
        from_middle = Follower(daemon, tmp_path / "middle", "--offset", str(middle), job.id)
        followers += [resumed, from_middle]
        os.kill(job.pid, signal.SIGUSR1)
        await until(lambda: resumed.done() and from_middle.done(), what="both to exit")
    finally:
        client.close()
    assert resumed.proc.returncode == 0 and from_middle.proc.returncode == 0
    expected = digests(digest)["stdout"]
    assert sha256(bytes(first) + resumed.out.read_bytes()) == expected
    assert sha256(bytes(first[:middle]) + from_middle.out.read_bytes()) == expected


def test_jwclient_follows_stderr_or_both_streams_to_their_own_descriptors(
        daemon: Daemon) -> None:
    """``logs -f --stderr`` follows stderr; ``--both`` writes the job's stdout to stdout and
    its stderr to stderr; following an unknown job fails with one line."""
    job = daemon.jwclient("start", "--", "sh", "-c",
                          "printf out1; printf err1 >&2; sleep 0.2; printf out2; printf err2 >&2",
                          check=True).stdout.decode().strip()
    both = daemon.jwclient("logs", "-f", "--both", job, timeout=WAIT)
    assert (both.returncode, both.stdout, both.stderr) == (0, b"out1out2", b"err1err2")
    err = daemon.jwclient("logs", "-f", "--stderr", job, timeout=WAIT)
    assert (err.returncode, err.stdout) == (0, b"err1err2")
    missing = daemon.jwclient("logs", "-f", "no-such-job", timeout=WAIT)
    assert missing.returncode == 1
    assert missing.stderr.decode().count("\n") == 1 and "no-such-job" in missing.stderr.decode()


@pytest_twisted.ensureDeferred
async def test_a_follower_that_disconnects_frees_its_descriptors_and_watches(
        make_daemon: Any, writer: Writer, followers: list[Follower], tmp_path: Path) -> None:
    """Followers idle at the live end, paused mid-stream, or killed outright: once gone,
    the daemon holds no more descriptors and no inotify watch than before they came."""
    d = make_daemon()
    control = await connect(reactor, d.config())
    try:
        job, _ = await writer.start(client=control, stdout=4 * MiB, stderr=0, hold=4 * MiB)
        await until(lambda: log_size(job) == 4 * MiB, what="the output")
        fds, watches = fd_count(d.pid), inotify_watches(d.pid)
        assert watches == 0
        idle = await connect(reactor, d.config())
        idle_sink = Hasher()
        idle_follow = Deferred.fromCoroutine(idle.logs(job.id, idle_sink, follow=True))
        await until(lambda: idle_sink.size == 4 * MiB, what="the idle follower to catch up")
        paused = await connect(reactor, d.config())
        paused.protocol.transport.pauseProducing()  # stop reading the socket
        # The idle stream first: once a stream fills the transport, the connection takes
        # no further request until its peer reads.
        paused_follows = [Deferred.fromCoroutine(paused.logs(job.id, Hasher(), s, follow=True))
                          for s in ("stderr", "stdout")]
        process = Follower(d, tmp_path / "killed", job.id)
        followers.append(process)
        await until(lambda: process.size() == 4 * MiB, what="jwclient to catch up")
        # 3 sockets and 4 log descriptors; one watch for each of the two files.
        await until(lambda: fd_count(d.pid) == fds + 7, what="the followers' descriptors")
        assert inotify_watches(d.pid) == 2
        assert "follow.poll_fallback" not in d.log()

        idle.close()
        paused.protocol.transport.abortConnection()
        process.kill()
        await until(lambda: fd_count(d.pid) == fds and inotify_watches(d.pid) == 0,
                    what="descriptors and watches to be freed")
        for follow in [idle_follow, *paused_follows]:
            with pytest.raises(ConnectionLost):
                await within(follow)
        os.kill(job.pid, signal.SIGUSR1)
        await within(control.call("wait", {"job": job.id}))
    finally:
        control.close()
    assert d.tracebacks() == []


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_followers_that_stop_reading_for_10s_leave_the_daemon_rss_flat(
        make_daemon: Any, writer: Writer) -> None:
    """While a job writes 200 MiB to stdout and 64 MiB to stderr, two followers stop
    reading their sockets for 10 s, one following stdout, one both streams on one
    connection: the daemon's RSS grows by less than 32 MiB, and then both receive
    every byte."""
    d = make_daemon()
    control = await connect(reactor, d.config())
    one = await connect(reactor, d.config())
    both = await connect(reactor, d.config())
    try:
        job, digest = await writer.start(control, stdout=200 * MiB, stderr=64 * MiB, hold=0,
                                         seed=200)
        sinks = [Hasher(), Hasher(), Hasher()]
        follows = [
            Deferred.fromCoroutine(one.logs(job.id, sinks[0], "stdout", follow=True)),
            Deferred.fromCoroutine(both.logs(job.id, sinks[1], "stdout", follow=True)),
            Deferred.fromCoroutine(both.logs(job.id, sinks[2], "stderr", follow=True)),
        ]
        await until(lambda: inotify_watches(d.pid) == 2, what="the followers to be served")
        for client in (one, both):
            client.protocol.transport.pauseProducing()  # TCP stopReading on the socket
        paused_at = time.monotonic()
        ended = control.call("wait", {"job": job.id})
        base = peak = rss_kib(d.pid)
        os.kill(job.pid, signal.SIGUSR1)
        while time.monotonic() - paused_at < 10.0:
            peak = max(peak, rss_kib(d.pid))
            await deferLater(reactor, 0.05, lambda: None)
        assert ended.called, "the job did not write its 264 MiB within 10 s"
        assert [s.size for s in sinks] == [0, 0, 0]  # the sockets really were not read
        paused_peak = peak
        for client in (one, both):
            client.protocol.transport.resumeProducing()
        done = DeferredList(follows, fireOnOneErrback=True, consumeErrors=True)
        while not done.called:
            peak = max(peak, rss_kib(d.pid))
            await deferLater(reactor, 0.05, lambda: None)
        await within(done, 60.0)
    finally:
        for client in (control, one, both):
            client.close()
    expected = digests(digest)
    assert [s.size for s in sinks] == [200 * MiB, 200 * MiB, 64 * MiB]
    assert [s.hexdigest() for s in sinks] == [expected["stdout"], expected["stdout"],
                                              expected["stderr"]]
    print(f"daemon RSS {base / 1024:.1f} MiB; peak while paused +{(paused_peak - base) / 1024:.1f}"
          f" MiB, overall +{(peak - base) / 1024:.1f} MiB")
    assert peak - base < 32 * 1024
    assert d.tracebacks() == []
