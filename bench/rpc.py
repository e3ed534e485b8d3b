"""RPC round trip: ``status`` of one job, against a bare Twisted mutual-TLS echo.

How: one client (jobworker's RPCClientProtocol over mutual TLS 1.3) asks ``status`` of one
ended job.  Latency: one request at a time, N round trips, p50 and p99.  Rate: 16 requests
kept in flight on the connection for a fixed window; replies per second.

Baseline, same run: an echo server in its own process built from the same pieces
(jobworker.rpc.tls.ServerTLS, TLSMemoryBIOFactory, FrameProtocol) that sends every frame
straight back, so it costs TLS + framing and nothing else; the same client sends it the
same ``status`` frames.  Daemon and echo are measured alternately, several rounds each.
Target: status rate >= 0.7 x the echo's rate.  For scale, a second echo runs on the
daemon's own transport (jobworker.rpc.transport.ServerTLSFactory, which writes each read's replies
straight to the socket rather than one or two reactor iterations later, and replies gathered
per read as the daemon does): the ratio against it is what the daemon's request handling
alone costs.  The client (jobworker.client) is the same for all three and also writes
straight to its socket.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Self

import harness
from harness import TRUE, Bench, Figure, Result, percentile, say

WINDOW = 16


def run(quick: bool) -> Result:
    rounds = 2 if quick else 5
    count = 200 if quick else 1000  # sequential round trips per round
    seconds = 0.5 if quick else 2.0  # pipelined window per round
    result = Result("rpc", harness.how(__doc__))
    say(__doc__)
    say(f"  {rounds} rounds of {count} round trips and {seconds:g}s at {WINDOW} in flight")

    with Bench("rpc") as bench, EchoServer(bench) as echo, \
            EchoServer(bench, direct=True) as direct:
        m = harness.run_on_reactor(
            lambda reactor: measure(reactor, bench, echo, direct, rounds, count, seconds))

    lat, echo_lat = [x * 1000 for x in m["lat"]], [x * 1000 for x in m["echo_lat"]]
    result.add(Figure("status round trip p50", percentile(lat, 50), "ms",
                      "TLS echo p50", percentile(echo_lat, 50)))
    result.add(Figure("status round trip p99", percentile(lat, 99), "ms",
                      "TLS echo p99", percentile(echo_lat, 99)))
    rate, echo_rate = sum(m["rate"]) / rounds, sum(m["echo_rate"]) / rounds
    result.add(Figure(f"status requests/s ({WINDOW} in flight)", rate, "req/s",
                      "TLS echo", echo_rate, ">= 0.7"))
    seq, echo_seq = len(lat) / sum(m["lat"]), len(echo_lat) / sum(m["echo_lat"])
    result.add(Figure("status requests/s (1 in flight)", seq, "req/s", "TLS echo", echo_seq))
    result.add(Figure(f"  status requests/s ({WINDOW} in flight), against an echo on the "
                      "daemon's transport", rate, "req/s", "TLS echo, direct writes",
                      sum(m["direct_rate"]) / rounds))
    us = 1e6 / rounds
    result.add(Figure(f"  daemon CPU per status ({WINDOW} in flight)",
                      sum(m["server_cpu"]) * us, "us", "echo server CPU per request",
                      sum(m["echo_server_cpu"]) * us))
    result.add(Figure(f"  client CPU per status ({WINDOW} in flight)",
                      sum(m["client_cpu"]) * us, "us", "client CPU per echo",
                      sum(m["echo_client_cpu"]) * us))
    result.series["rpc"] = {"rate_rounds": m["rate"], "echo_rate_rounds": m["echo_rate"],
                            "direct_echo_rate_rounds": m["direct_rate"]}
    return result


async def measure(reactor: Any, bench: Bench, echo: EchoServer, direct: EchoServer,
                  rounds: int, count: int, seconds: float) -> dict[str, list[float]]:
    from jobworker.client.api import ClientConfig, connect

    (client,) = await harness.connect(reactor, bench)
    cfg = bench.config()
    echo_client = await connect(reactor, ClientConfig(f"127.0.0.1:{echo.port}", cfg.ca,
                                                      cfg.cert, cfg.key))
    direct_client = await connect(reactor, ClientConfig(f"127.0.0.1:{direct.port}", cfg.ca,
                                                        cfg.cert, cfg.key))
    try:
        record = await client.call("start", {"command": TRUE, "args": []})
        await client.call("wait", {"job": record["id"]})
        params = {"job": record["id"]}
        out: dict[str, list[float]] = {"lat": [], "echo_lat": [], "rate": [], "echo_rate": [],
                                       "direct_lat": [], "direct_rate": []}
        for c in (client, echo_client, direct_client):  # warm every path
            for _ in range(100):
                await c.call("status", params)
        servers = {"echo_": echo.proc.pid if echo.proc else 0, "": bench.pid,
                   "direct_": direct.proc.pid if direct.proc else 0}
        for key in servers:
            out[key + "server_cpu"], out[key + "client_cpu"] = [], []
        for _ in range(rounds):
            for c, key in ((echo_client, "echo_"), (client, ""), (direct_client, "direct_")):
                out[key + "lat"] += await sequential(c, params, count)
                s0, c0 = cpu_seconds(servers[key]), cpu_seconds(os.getpid())
                began = time.perf_counter()
                rate = await pipelined(c, params, seconds)
                requests = rate * (time.perf_counter() - began)
                out[key + "rate"].append(rate)
                out[key + "server_cpu"].append((cpu_seconds(servers[key]) - s0) / requests)
                out[key + "client_cpu"].append((cpu_seconds(os.getpid()) - c0) / requests)
        say(f"  rates per round: status {[round(r) for r in out['rate']]}, "
            f"echo {[round(r) for r in out['echo_rate']]}, "
            f"echo on direct writes {[round(r) for r in out['direct_rate']]}")
        return out
    finally:
        harness.close_all([client, echo_client, direct_client])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``), every thread."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sequential(client: Any, params: dict[str, Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        await client.call("status", params)
        samples.append(time.perf_counter() - began)
    return samples


async def pipelined(client: Any, params: dict[str, Any], seconds: float) -> float:
    from twisted.internet.defer import Deferred, gatherResults

    done = [0]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await client.call("status", params)
            done[0] += 1

    began = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(WINDOW)])
    return done[0] / (time.perf_counter() - began)


class EchoServer:
    """``rpc.py --echo-server PKI_DIR`` in its own process group, ended by pid."""

    def __init__(self, bench: Bench, direct: bool = False) -> None:
        self.bench = bench
        self.direct = direct
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> Self:
        log = self.bench.tmp / ("echo-direct.log" if self.direct else "echo.log")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--echo-server", str(self.bench.pki_dir),
                 *(["--direct"] if self.direct else [])],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        harness.record_pid(self.proc.pid)
        deadline = time.monotonic() + 20
        while not self.port:
            m = re.search(r"echo\.listening port=(\d+)", log.read_text())
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"echo server did not start:\n{log.read_text()[-2000:]}")
            else:
                time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _older_server_tls_factory(base: Any) -> Any:
    """The daemon's TLS factory in checkouts that predate ``jobworker.rpc.transport``."""
    try:
        from jobworker.tls import ServerTLSFactory  # type: ignore[import-not-found]

        return ServerTLSFactory
    except ImportError:  # older still: the same thing spelled out
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        class ServerTLSFactory(base):  # type: ignore[no-redef]
            protocol = TLSMemoryBIOProtocol

        return ServerTLSFactory


def echo_server(pki_dir: str, direct: bool = False) -> None:
    """Mutual TLS 1.3 from jobworker.rpc.tls, frames from jobworker.rpc.framing, nothing else.
    ``direct``: the daemon's transport, and each read's replies written together."""
    from twisted.internet import endpoints, reactor
    from twisted.internet.protocol import Factory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    try:
        from jobworker.rpc.framing import FrameProtocol
        from jobworker.rpc.tls import ServerTLS
        from jobworker.wire.frames import PREFIX as _PREFIX
    except ImportError:  # a checkout from before the layered layout
        from jobworker.protocol import _PREFIX, FrameProtocol  # type: ignore[no-redef]
        from jobworker.tls import ServerTLS  # type: ignore[no-redef]

    class Echo(FrameProtocol):
        def stringReceived(self, string: bytes) -> None:
            self.transport.writeSequence([_PREFIX.pack(len(string)), string])

    class GatheringEcho(FrameProtocol):
        def stringReceived(self, string: bytes) -> None:
            self.send_encoded(bytes(string))  # gathered until the read is handled

    tls = ServerTLS(os.path.join(pki_dir, "ca.pem"), os.path.join(pki_dir, "server.pem"),
                    os.path.join(pki_dir, "server.key"))
    if direct:
        try:
            from jobworker.rpc.transport import ServerTLSFactory
        except ImportError:
            ServerTLSFactory = _older_server_tls_factory(TLSMemoryBIOFactory)
        factory = ServerTLSFactory(tls, False, Factory.forProtocol(GatheringEcho))
    else:
        factory = TLSMemoryBIOFactory(tls, False, Factory.forProtocol(Echo))
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

    def listening(port: Any) -> None:
        print(f"echo.listening port={port.getHost().port}", flush=True)

    def failed(reason: Any) -> None:
        print(f"echo.failed {reason.getErrorMessage()}", flush=True)
        reactor.stop()

    endpoint.listen(factory).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--echo-server"]:
        echo_server(sys.argv[2], direct="--direct" in sys.argv[3:])
    else:
        opts = harness.cli(__doc__)
        harness.finish(run(opts.quick), opts.json)
