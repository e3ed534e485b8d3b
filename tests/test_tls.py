"""Mutual TLS 1.3 against a real daemon: who is served, who is refused, and what the client checks."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_twisted
from conftest import PKI, Daemon
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from jobworker import PROTOCOL_VERSION, pki
from jobworker.client.api import ClientConfig, ClientError, connect

HELLO = {"id": 1, "method": "hello", "params": {"version": PROTOCOL_VERSION}}


# -- a plain stdlib TLS client, independent of jobworker's own --------------------------------


def client_context(ca: str, cert: str | None = None, key: str | None = None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def send_frame(sock: ssl.SSLSocket, value: Any) -> None:
    payload = msgpack.packb(value, use_bin_type=True)
    sock.sendall(struct.pack("!I", len(payload)) + payload)


def read_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError("closed")
        data += more
    return data


def read_frame(sock: ssl.SSLSocket) -> Any:
    (length,) = struct.unpack("!I", read_exactly(sock, 4))
    return msgpack.unpackb(read_exactly(sock, length), raw=False)


def try_request(daemon: Daemon, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Connect, say hello, read a reply: ('served', version) or ('refused', why).

    In TLS 1.3 the client finishes its handshake before the server has checked the client
    certificate, so a refusal may only show when the first request is answered with an
    alert or a close.  A socket timeout (neither answer nor close) fails the test.
    """
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as raw:
        try:
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        except (ssl.SSLError, ConnectionError) as e:
            return "refused", f"handshake: {e}"
        with sock:
            try:
                send_frame(sock, HELLO)
                reply = read_frame(sock)
            except (ssl.SSLError, ConnectionError, EOFError) as e:
                return "refused", f"after handshake: {e}"
            assert reply["id"] == 1 and reply["result"]["version"] == PROTOCOL_VERSION
            return "served", str(sock.version())


def paths(p: PKI, name: str) -> tuple[str, str]:
    _, cert, key = p.paths(name)
    return cert, key


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A second, unrelated PKI: its certificates look right but are signed by a stranger."""
    p = PKI(tmp_path_factory.mktemp("other-pki"))
    p.client("alice", "user")
    return p


# -- the daemon's side -------------------------------------------------------------------------


def test_a_good_client_is_served_over_tls_1_3(daemon: Daemon, test_pki: PKI) -> None:
    """alice's certificate completes a TLS 1.3 handshake and hello is answered."""
    ctx = client_context(test_pki.ca, *paths(test_pki, "alice"))
    assert try_request(daemon, ctx) == ("served", "TLSv1.3")


def test_no_client_certificate_is_never_served(daemon: Daemon, test_pki: PKI) -> None:
    """Without a client certificate the server answers no request: certificate required."""
    outcome, why = try_request(daemon, client_context(test_pki.ca))
    assert outcome == "refused"
    assert "CERTIFICATE_REQUIRED" in why


@pytest.mark.parametrize("name, alert", [
    ("expired", "CERTIFICATE_EXPIRED"),
    ("noeku", "ALERT"),  # no EKU at all: refused by our leaf check
    ("servereku", "UNSUPPORTED_CERTIFICATE"),  # serverAuth only: refused by OpenSSL
    ("caleaf", "ALERT"),  # a CA certificate used as a leaf: refused by our leaf check
])
def test_unfit_client_certificates_are_refused(daemon: Daemon, test_pki: PKI, name: str,
                                               alert: str) -> None:
    """Expired, EKU-less, serverAuth-only and CA:TRUE client certificates get no reply."""
    outcome, why = try_request(daemon, client_context(test_pki.ca, *paths(test_pki, name)))
    assert outcome == "refused"
    assert alert in why


def test_a_certificate_from_another_ca_is_refused(daemon: Daemon, test_pki: PKI,
                                                  other_ca: PKI) -> None:
    """A well-formed client certificate signed by an unknown CA: unknown CA, no reply."""
    # Trust the daemon's CA ourselves, but present the stranger's certificate.
    ctx = client_context(test_pki.ca, *paths(other_ca, "alice"))
    outcome, why = try_request(daemon, ctx)
    assert outcome == "refused" and "UNKNOWN_CA" in why


def test_a_tls_1_2_only_client_is_refused(daemon: Daemon, test_pki: PKI) -> None:
    """A client that offers at most TLS 1.2 fails the handshake with a protocol version alert."""
    ctx = client_context(test_pki.ca, *paths(test_pki, "alice"),
                         max_version=ssl.TLSVersion.TLSv1_2)
    outcome, why = try_request(daemon, ctx)
    assert outcome == "refused"
    assert why.startswith("handshake:") and "PROTOCOL_VERSION" in why


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary on PATH")
def test_openssl_s_client_tls_1_2_is_refused(daemon: Daemon, test_pki: PKI) -> None:
    """``openssl s_client -tls1_2`` gets no session; the same command with -tls1_3 gets one."""
    cert, key = paths(test_pki, "alice")

    def s_client(version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", version, "-connect", f"127.0.0.1:{daemon.port}",
             "-CAfile", test_pki.ca, "-cert", cert, "-key", key],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)

    old = s_client("-tls1_2")
    assert old.returncode != 0
    assert "alert protocol version" in old.stdout + old.stderr
    assert "Cipher is (NONE)" in old.stdout
    new = s_client("-tls1_3")
    assert "New, TLSv1.3" in new.stdout, new.stdout + new.stderr


def test_refused_handshakes_leave_no_traceback(daemon: Daemon, test_pki: PKI) -> None:
    """After all the refusals above the daemon still serves, and its log has no Traceback."""
    ctx = client_context(test_pki.ca, *paths(test_pki, "bob"))
    assert try_request(daemon, ctx)[0] == "served"
    assert daemon.tracebacks() == []


# -- the client's side -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_client_connects_and_says_hello(daemon: Daemon) -> None:
    """jobworker's own client completes TLS and hello, and whoami answers."""
    client = await connect(reactor, daemon.config("alice"), timeout=10)
    try:
        assert client.server_info["version"] == PROTOCOL_VERSION
        assert await client.call("whoami") == {"identity": "alice", "role": "user"}
        # Its TLS records leave at once (jobworker.rpc.writethrough), not a reactor turn later.
        tcp = client.protocol.transport.transport
        assert "write" in vars(tcp), "the client's socket writes are not write-through"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_the_client_refuses_a_server_named_for_another_host(
        make_daemon: Any, test_pki: PKI, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server certificate for other.example only, dialled as 127.0.0.1: ClientError naming the mismatch."""
    monkeypatch.setattr(pki.certs, "DEFAULT_SERVER_HOSTS", ())  # no localhost/127.0.0.1 SANs
    key, cert = pki.make_server_cert(test_pki.ca_key, test_pki.ca_cert, ["other.example"])
    pki.write_key(tmp_path / "other.key", key)
    pki.write_cert(tmp_path / "other.pem", cert)
    d = make_daemon("--cert", str(tmp_path / "other.pem"), "--key", str(tmp_path / "other.key"))
    with pytest.raises(ClientError) as info:
        await connect(reactor, d.config("alice"), timeout=10)
    message = str(info.value)
    assert "does not match" in message and "127.0.0.1" in message, message
    assert "\n" not in message
    assert d.tracebacks() == []


@implementer(IOpenSSLServerConnectionCreator)
class RawServerTLS:
    """A TLS 1.3 server with any certificate at all (the daemon refuses to run with bad ones)."""

    def __init__(self, ca: str, cert: Any, key: Any) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate(cert)
        ctx.use_privatekey(key)
        ctx.load_verify_locations(ca.encode())
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                       lambda conn, x509, errno, depth, ok: bool(ok))
        self.context = ctx

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)


async def refused_by_client(server_tls: RawServerTLS, test_pki: PKI,
                            timeout: float = 10) -> str:
    """Run a server with ``server_tls`` in this process; return the client's ClientError."""
    factory = TLSMemoryBIOFactory(server_tls, False, Factory.forProtocol(Protocol))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        config = ClientConfig(f"127.0.0.1:{port.getHost().port}", *test_pki.paths("alice"))
        with pytest.raises(ClientError) as info:
            await connect(reactor, config, timeout=timeout)
        return str(info.value)
    finally:
        await port.stopListening()


@pytest.mark.parametrize("kind, expected", [
    ("no EKU", "certificate has no extended key usage"),
    ("clientAuth only", "lacks the serverAuth extended key usage"),
])
@pytest_twisted.ensureDeferred
async def test_the_client_refuses_a_server_certificate_without_server_auth(
        test_pki: PKI, kind: str, expected: str) -> None:
    """A server certificate not made for serverAuth is refused, with the reason."""
    if kind == "no EKU":
        key, cert = pki.make_server_cert(test_pki.ca_key, test_pki.ca_cert, [], eku=False)
    else:
        key, cert = pki.make_client_cert(test_pki.ca_key, test_pki.ca_cert, "localhost",
                                         eku="clientAuth")
    message = await refused_by_client(RawServerTLS(test_pki.ca, cert, key), test_pki)
    assert expected in message, message


@pytest_twisted.ensureDeferred
async def test_the_client_refuses_a_server_from_another_ca(test_pki: PKI,
                                                           other_ca: PKI) -> None:
    """A server whose certificate chains to a CA we do not trust fails verification."""
    key, cert = pki.make_server_cert(other_ca.ca_key, other_ca.ca_cert, [])
    message = await refused_by_client(RawServerTLS(test_pki.ca, cert, key), test_pki)
    assert "verify failed" in message, message


@pytest_twisted.ensureDeferred
async def test_the_client_control_server_is_accepted_with_a_good_certificate(
        test_pki: PKI) -> None:
    """Control for the two tests above: the same raw server with a proper certificate gets
    past TLS (the client then fails only because this server never answers hello)."""
    key, cert = pki.make_server_cert(test_pki.ca_key, test_pki.ca_cert, [])
    message = await refused_by_client(RawServerTLS(test_pki.ca, cert, key), test_pki, timeout=1)
    assert "no answer within" in message, message


@pytest.mark.parametrize("name, reason", [
    ("noeku", "no extended key usage"),
    ("servereku", "lacks the clientAuth"),
    ("caleaf", "CA certificate"),
])
def test_jwclient_will_not_present_an_unfit_certificate(daemon: Daemon, name: str,
                                                        reason: str) -> None:
    """jwclient refuses its own unfit certificate up front: one line, exit 1, no traceback."""
    result = daemon.jwclient("whoami", identity=name)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b""
    assert stderr.count("\n") == 1 and stderr.startswith("jwclient: ") and reason in stderr
    assert "Traceback" not in stderr


def test_jwclient_reports_a_refused_expired_certificate(daemon: Daemon) -> None:
    """With an expired certificate the server refuses the handshake; jwclient says so in one line."""
    result = daemon.jwclient("whoami", identity="expired")
    stderr = result.stderr.decode()
    assert result.returncode == 1 and stderr.count("\n") == 1
    assert stderr.startswith("jwclient: ") and "expired" in stderr
