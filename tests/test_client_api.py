"""The synchronous client (``from jobworker.client import Client``): no Twisted on
jwclient's path, the TLS checks it makes itself, the API against a real daemon, and
pipelined starts and waits."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from conftest import PKI, Daemon
from cryptography import x509

from jobworker import pki
from jobworker.client import (
    Client,
    ClientConfig,
    ClientError,
    Forbidden,
    JobRecord,
    NotFound,
    leafcheck,
    sync,
)
from jobworker.client.session import Session
from jobworker.client.sync import IN_FLIGHT, start_params
from jobworker.wire import tlspolicy
from jobworker.wire.errors import ConnectionLost

pytestmark = pytest.mark.timeout(60, method="thread")


def test_jwclient_and_the_wire_layer_load_no_twisted(daemon: Daemon) -> None:
    """A whole jwclient call (parse, connect, TLS, hello, whoami, print) and the wire
    modules it can use import no ``twisted``, ``OpenSSL`` or ``cryptography`` module (nor
    ``shtab``, which only ``completion`` needs); the wire layer's two certificate modules
    (the daemon's) add cryptography but no Twisted either."""
    code = (
        "import sys, pkgutil, importlib, jobworker.wire\n"
        "for m in pkgutil.iter_modules(jobworker.wire.__path__):\n"
        "    if m.name not in ('tlspolicy', 'identity'):  # cryptography: below\n"
        "        importlib.import_module('jobworker.wire.' + m.name)\n"
        "from jobworker.client import cli\n"
        "status = cli.main(sys.argv[1:])\n"
        "heavy = sorted(n for n in sys.modules if n.split('.')[0] in\n"
        "               ('twisted', 'OpenSSL', 'cryptography', 'service_identity', 'shtab'))\n"
        "import jobworker.wire.tlspolicy, jobworker.wire.identity  # the daemon's two\n"
        "twisted = sorted(n for n in sys.modules if n.split('.')[0] == 'twisted')\n"
        "print('HEAVY', heavy, status, twisted)\n")
    result = subprocess.run(
        [sys.executable, "-c", code, "--server", daemon.address, "--pki",
         str(daemon.pki.dir), "--identity", "alice", "whoami"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "identity: alice" in result.stdout
    assert result.stdout.splitlines()[-1] == "HEAVY [] 0 []", result.stdout


@pytest.mark.parametrize("name, purpose", [
    ("alice", leafcheck.CLIENT_AUTH), ("noeku", leafcheck.CLIENT_AUTH),
    ("servereku", leafcheck.CLIENT_AUTH), ("caleaf", leafcheck.CLIENT_AUTH),
    ("server", leafcheck.SERVER_AUTH), ("alice", leafcheck.SERVER_AUTH),
])
def test_the_der_walk_agrees_with_the_wire_policy(test_pki: PKI, name: str,
                                                  purpose: bytes) -> None:
    """leafcheck's verdict on each kind of certificate is tlspolicy's (cryptography's
    parser), word for word: fit, no EKU, wrong EKU, a CA as a leaf."""
    data = (test_pki.dir / f"{name}.pem").read_bytes()
    (der,) = leafcheck.pem_certificates(data)
    wanted = tlspolicy.SERVER_AUTH if purpose == leafcheck.SERVER_AUTH else \
        tlspolicy.CLIENT_AUTH
    expected = tlspolicy.leaf_problem(x509.load_pem_x509_certificate(data), wanted)
    assert leafcheck.leaf_problem(der, purpose) == expected


def test_the_der_walk_refuses_garbage_in_words() -> None:
    """Bytes that are no certificate give a reason, never an exception."""
    for junk in (b"", b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x04\x00"):
        assert leafcheck.leaf_problem(junk, leafcheck.SERVER_AUTH).startswith(
            "certificate could not be read")


# -- servers with unfit certificates ----------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[object]:
    """``serve(cert, key)``: a one-shot TLS 1.3 server on 127.0.0.1 with any certificate,
    in a thread; returns its port."""
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def serve(cert: x509.Certificate, key: object, ca: str) -> int:
        n = len(threads)
        cert_path, key_path = tmp_path / f"s{n}.pem", tmp_path / f"s{n}.key"
        pki.write_cert(cert_path, cert)
        pki.write_key(key_path, key)  # type: ignore[arg-type]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert_path, key_path)
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        listener = socket.create_server(("127.0.0.1", 0))
        sockets.append(listener)

        def accept() -> None:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    while tls.recv(4096):  # never answers; until the client gives up
                        pass
            except OSError:
                pass

        threads.append(threading.Thread(target=accept, daemon=True))
        threads[-1].start()
        return int(listener.getsockname()[1])

    yield serve
    for s in sockets:
        s.close()
    for t in threads:
        t.join(10)


@pytest.mark.parametrize("kind, expected", [
    ("no EKU", "server certificate has no extended key usage"),
    ("clientAuth only", "server certificate lacks the serverAuth extended key usage"),
    ("another host", "does not match '127.0.0.1'"),
])
def test_the_client_refuses_unfit_server_certificates(
        test_pki: PKI, tls_server: object, kind: str, expected: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server certificate that chains to our CA but lacks serverAuth (or any EKU), or
    names another host, is refused with the reason, as a ClientError."""
    if kind == "no EKU":
        key, cert = pki.make_server_cert(test_pki.ca_key, test_pki.ca_cert, [], eku=False)
    elif kind == "clientAuth only":
        key, cert = pki.make_client_cert(test_pki.ca_key, test_pki.ca_cert, "localhost",
                                         eku="clientAuth")
    else:
        monkeypatch.setattr(pki.certs, "DEFAULT_SERVER_HOSTS", ())
        key, cert = pki.make_server_cert(test_pki.ca_key, test_pki.ca_cert, ["other.example"])
    port = tls_server(cert, key, test_pki.ca)  # type: ignore[operator]
    with pytest.raises(ClientError) as info:
        Client(ClientConfig(f"127.0.0.1:{port}", *test_pki.paths("alice")), timeout=5)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_server_from_another_ca_fails_verification(test_pki: PKI, tls_server: object,
                                                     tmp_path: Path) -> None:
    """A server whose certificate chains to a CA we do not trust: 'verify failed'."""
    other = PKI(tmp_path / "other")
    key, cert = pki.make_server_cert(other.ca_key, other.ca_cert, [])
    port = tls_server(cert, key, test_pki.ca)  # type: ignore[operator]
    with pytest.raises(ClientError, match="verify failed"):
        Client(ClientConfig(f"127.0.0.1:{port}", *test_pki.paths("alice")), timeout=5)


def test_the_client_speaks_tls_1_3_only(daemon: Daemon) -> None:
    """The session is TLS 1.3 with the daemon."""
    with Client(daemon.address, pki=str(daemon.pki.dir), identity="alice") as client:
        assert client.session._sock.version() == "TLSv1.3"
        assert client.server_info["max_frame"] > 0


# -- the API --------------------------------------------------------------------------------


def test_the_api_runs_a_job_end_to_end(daemon: Daemon) -> None:
    """start, status, wait, logs, follow (with its final offset), list and forget, as
    methods and iterators on one context-managed client."""
    with Client(daemon.address, pki=str(daemon.pki.dir), identity="alice") as client:
        assert client.whoami() == {"identity": "alice", "role": "user"}
        job = client.start("sh", ["-c", "echo out; echo err >&2"], env=["A=1"])
        assert isinstance(job, JobRecord) and client.status(job.id).id == job.id
        follow = client.follow(job.id)
        assert b"".join(follow) == b"out\n"
        assert follow.offset == 4 and follow.record is not None and follow.record.ended
        ended = client.wait(job.id)
        assert (ended.state, ended.exit_code) == ("exited", 0)
        assert b"".join(client.logs(job.id, "stderr")) == b"err\n"
        assert b"".join(client.logs(job.id, offset=2)) == b"t\n"
        assert job.id in {r.id for r in client.list(limit=1000)}
        assert client.forget(job.id) == {"job": job.id}
        with pytest.raises(NotFound, match="no job"):
            client.status(job.id)


def test_errors_are_typed_per_code(daemon: Daemon) -> None:
    """A missing job is NotFound; a viewer's start is Forbidden; the client goes on."""
    with Client(daemon.address, pki=str(daemon.pki.dir), identity="auditor") as client:
        with pytest.raises(Forbidden):
            client.start("true")
        with pytest.raises(NotFound):
            client.wait("00000000-0000-4000-8000-000000000000")
        assert client.whoami()["role"] == "viewer"


def test_many_starts_and_waits_pipeline_on_one_connection(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """More jobs than requests in flight (a window of 8 here, 128 in use), started and
    waited on one connection, results in the order asked; a bad start is its error in its
    place."""
    assert IN_FLIGHT == 128
    monkeypatch.setattr(sync, "IN_FLIGHT", 8)
    count = 8 * 3 + 5
    with Client(daemon.address, pki=str(daemon.pki.dir), identity="alice") as client:
        requests = [start_params("sh", ["-c", f"exit {i % 3}"]) for i in range(count)]
        requests[7] = {"command": "true", "args": "not a list"}
        started = client.start_many(requests)
        assert [type(r).__name__ for r in started].count("JobRecord") == count - 1
        assert getattr(started[7], "code", None) == "bad_request"
        ids = [r.id for r in started if isinstance(r, JobRecord)]
        seen: list[int] = []
        ended = client.wait_many(ids, lambda i, record: seen.append(i))
        statuses = [r.exit_code for r in ended if isinstance(r, JobRecord)]
        expected = [i % 3 for i in range(count) if i != 7]
        assert statuses == expected and sorted(seen) == list(range(count - 1))


def test_leaving_a_follow_early_keeps_the_client_usable(daemon: Daemon) -> None:
    """Breaking out of a follow of a chatty job: later calls on the same client answer,
    and the abandoned stream's chunks are not kept."""
    with Client(daemon.address, pki=str(daemon.pki.dir), identity="alice") as client:
        job = client.start("sh", ["-c", "while :; do echo more; done"])
        follow = client.follow(job.id)
        for _ in follow:
            break
        assert client.status(job.id).state == "running"
        assert len(follow._chunks) == 0
        assert client.stop(job.id, grace=0.5).state == "stopped"


def test_a_server_that_never_answers_hello_is_a_timeout(test_pki: PKI,
                                                        tls_server: object) -> None:
    """Control for the refusals above: a proper certificate gets past TLS, and a server
    that then says nothing is 'no answer within' the timeout, not a hang."""
    key, cert = pki.make_server_cert(test_pki.ca_key, test_pki.ca_cert, [])
    port = tls_server(cert, key, test_pki.ca)  # type: ignore[operator]
    with pytest.raises(ClientError, match="no answer within 0.5s"):
        Client(ClientConfig(f"127.0.0.1:{port}", *test_pki.paths("alice")), timeout=0.5)


# -- the session's framing, over a socketpair -------------------------------------------------


def frame(value: object) -> bytes:
    payload = msgpack.packb(value, use_bin_type=True)
    return struct.pack("!I", len(payload)) + payload


@pytest.fixture
def pair() -> Iterator[tuple[Session, socket.socket]]:
    """A Session on one end of a socketpair (no TLS: the framing is what is tested)."""
    ours, theirs = socket.socketpair()
    session = Session(ours, "pair")  # type: ignore[arg-type]
    yield session, theirs
    session.close()
    theirs.close()


def test_replies_fed_a_byte_at_a_time_reach_their_requests(
        pair: tuple[Session, socket.socket]) -> None:
    """Two requests in flight; chunks and results out of order, one byte per send,
    each to its own request."""
    session, server = pair
    chunks: list[object] = []
    first = session.send("logs", {}, chunks.append)
    second = session.send("status", {})
    data = frame({"id": second, "result": "two"}) + frame({"id": first, "chunk": b"c"}) + \
        frame({"id": 999, "result": "stray"}) + frame({"id": first, "result": "one"})
    for byte in data:
        server.send(bytes([byte]))
    assert session.wait_for(first, timeout=5)
    assert (session.take(first), session.take(second), chunks) == ("one", "two", [b"c"])


@pytest.mark.parametrize("data, message", [
    (struct.pack("!I", 2 * 1024 * 1024), "over the limit"),
    (frame([1, 2]), "not a map"),
    (struct.pack("!I", 1) + b"\xc1", "undecodable frame"),
    (b"", "the server closed the connection"),
])
def test_a_bad_reply_is_connection_lost_for_everything_in_flight(
        pair: tuple[Session, socket.socket], data: bytes, message: str) -> None:
    """An oversized frame, a frame that is not a map, undecodable bytes or a close:
    ConnectionLost with the reason, for every request in flight, and for later sends."""
    session, server = pair
    first, second = session.send("wait", {}), session.send("wait", {})
    server.sendall(data)
    server.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionLost, match=message):
        session.wait_for(first, timeout=5)
    for rid in (first, second):
        with pytest.raises(ConnectionLost, match=message):
            session.take(rid)
    with pytest.raises(ConnectionLost):
        session.send("status", {})


def test_the_clients_start_many_size_is_the_daemons() -> None:
    """jwclient keeps its own copy of start_many's limit (importing the schema costs it
    start-up time): the two must agree."""
    from jobworker.client import sync
    from jobworker.wire.params import START_MANY

    assert sync.START_MANY == START_MANY
