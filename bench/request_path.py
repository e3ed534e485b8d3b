"""The daemon's own cost per request, in this process: no TLS, no sockets, no reactor turns.

Run: .venv/bin/python bench/request_path.py [--requests 40000] [--batch 16] [--profile]

How: an RPCServerProtocol on a JobManager with fake processes (jobworker.testing) and real
log directories, its transport a sink; after ``hello``, frames are fed ``--batch`` per
``dataReceived`` as a pipelining client's would arrive.  Printed: microseconds per request
for ``status`` of one ended job, and for ``start /bin/true`` (its log directory and files
made for real, the spawn faked) plus the end of that job.  ``--profile`` adds cProfile's
top functions for ``status``.  Not part of run_all: it isolates the Python path that
bench/rpc.py and bench/throughput.py measure end to end.
"""

from __future__ import annotations

import os
import sys

# bench/profile.py would shadow the standard library's profile module, which cProfile needs.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH]

import argparse  # noqa: E402
import cProfile  # noqa: E402
import importlib.util  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

if importlib.util.find_spec("jobworker") is None:  # not installed: use this checkout
    sys.path.insert(0, os.path.dirname(_BENCH))

import msgpack  # noqa: E402
from OpenSSL import crypto  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from jobworker import PROTOCOL_VERSION, pki  # noqa: E402
from jobworker.daemon.authz import Authorizer  # noqa: E402
from jobworker.daemon.server import RPCServer  # noqa: E402
from jobworker.jobs.logs import LogStore  # noqa: E402
from jobworker.jobs.manager import JobManager  # noqa: E402
from jobworker.testing import ProcessReactor  # noqa: E402


def frame(value: dict[str, Any]) -> bytes:
    payload = msgpack.packb(value, use_bin_type=True)
    return struct.pack("!I", len(payload)) + payload


class Sink(StringTransport):
    """A transport that keeps nothing (a long run would otherwise hold every reply)."""

    def __init__(self, cert: crypto.X509) -> None:
        super().__init__()
        self.cert = cert

    def getPeerCertificate(self) -> crypto.X509:
        return self.cert

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    opts = parser.parse_args()
    ca_key, ca_cert = pki.make_ca()
    _, cert = pki.make_client_cert(ca_key, ca_cert, "bench", role="user")
    tmp = tempfile.mkdtemp(prefix="jw-request-path-", dir="/tmp")
    try:
        reactor = ProcessReactor()  # (not .at(): older checkouts lack it)
        reactor.advance(time.time())
        manager = JobManager(reactor, LogStore(os.path.join(tmp, "logs")),
                             killpg=reactor.killpg)
        proto = RPCServer(reactor, manager, Authorizer()).buildProtocol(None)
        proto.makeConnection(Sink(crypto.X509.from_cryptography(cert)))
        proto.handshakeCompleted()
        proto.dataReceived(frame({"id": 0, "method": "hello",
                                  "params": {"version": PROTOCOL_VERSION}}))
        job = manager.start("bench", "/bin/true", [])
        reactor.process(job.pid).exit(0)
        ids = iter(range(1, 2**53))

        def batches(method: str, params: dict[str, Any], n: int) -> list[bytes]:
            return [b"".join(frame({"id": next(ids), "method": method, "params": params})
                             for _ in range(opts.batch)) for _ in range(n // opts.batch)]

        status = {"job": job.id}
        for _ in range(3):
            data = batches("status", status, opts.requests)
            began = time.perf_counter()
            for chunk in data:
                proto.dataReceived(chunk)
            elapsed = time.perf_counter() - began
            print(f"status: {elapsed / (len(data) * opts.batch) * 1e6:.2f} us per request"
                  f" ({opts.batch} per read)")
        starts = max(opts.requests // 20, opts.batch)
        data = batches("start", {"command": "/bin/true", "args": []}, starts)
        began = time.perf_counter()
        for chunk in data:
            proto.dataReceived(chunk)
        started = time.perf_counter() - began
        pids = [j.pid for j in manager.jobs(running_only=True) if j.pid is not None]
        began = time.perf_counter()
        for pid in pids:
            reactor.process(pid).exit(0)
        ended = time.perf_counter() - began
        print(f"start: {started / (len(data) * opts.batch) * 1e6:.1f} us per request"
              f" (log directory made for real, spawn faked); job end: "
              f"{ended / max(len(pids), 1) * 1e6:.1f} us")
        if opts.profile:
            data = batches("status", status, opts.requests)
            profiler = cProfile.Profile()
            profiler.enable()
            for chunk in data:
                proto.dataReceived(chunk)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
