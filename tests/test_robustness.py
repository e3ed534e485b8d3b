"""A real daemon against client mistakes and abuse: bad frames, timeouts, the connection cap."""

from __future__ import annotations

import random
import re
import select
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from conftest import PKI, Daemon, wait_for

from jobworker import PROTOCOL_VERSION

CLIENT_ERRORS = {"bad_request", "frame_too_large", "unknown_method", "unsupported_version"}


class Conn:
    """A blocking stdlib-TLS connection speaking the wire protocol by hand."""

    def __init__(self, daemon: Daemon, identity: str = "alice", timeout: float = 10) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(daemon.pki.ca)
        _, cert, key = daemon.pki.paths(identity)
        ctx.load_cert_chain(cert, key)
        raw = socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, value: Any) -> None:
        payload = msgpack.packb(value, use_bin_type=True)
        self.send_raw(struct.pack("!I", len(payload)) + payload)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise EOFError("connection closed")
            data += more
        return data

    def read(self) -> Any:
        (length,) = struct.unpack("!I", self._exactly(4))
        return msgpack.unpackb(self._exactly(length), raw=False, strict_map_key=False)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.send({"id": rid, "method": method, "params": params or {}})
        reply = self.read()
        assert reply["id"] == rid, reply
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def hello(self) -> dict[str, Any]:
        return self.call("hello", {"version": PROTOCOL_VERSION})  # type: ignore[no-any-return]

    def closed_within(self, seconds: float) -> bool:
        """Whether the daemon closes the connection within ``seconds`` (frames are skipped)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(4096):
                    return True
            except (ssl.SSLError, ConnectionError):
                return True
            except TimeoutError:
                return False
        return False


def whoami_on_a_new_connection(daemon: Daemon, identity: str = "bob") -> dict[str, Any]:
    conn = Conn(daemon, identity)
    try:
        conn.hello()
        return conn.call("whoami")  # type: ignore[no-any-return]
    finally:
        conn.close()


# -- bad frames against the shared daemon ------------------------------------------------------


def test_a_2mib_frame_announced_gets_frame_too_large(daemon: Daemon) -> None:
    """A length prefix of 2 MiB is refused at once with frame_too_large; the daemon lives on."""
    conn = Conn(daemon)
    conn.hello()
    conn.send_raw(struct.pack("!I", 2 * 1024 * 1024) + b"\0" * 16)
    reply = conn.read()
    assert reply["id"] is None and reply["error"]["code"] == "frame_too_large"
    conn.close()
    assert whoami_on_a_new_connection(daemon)["identity"] == "bob"
    assert daemon.tracebacks() == []


def test_a_whole_2mib_frame_gets_a_clear_error_or_a_close(daemon: Daemon) -> None:
    """Sending all 2 MiB ends in frame_too_large or a close; the daemon lives on."""
    conn = Conn(daemon)
    conn.hello()
    payload = msgpack.packb({"id": 2, "method": "whoami", "params": {"x": b"\0" * (2 << 20)}})
    try:
        conn.send_raw(struct.pack("!I", len(payload)) + payload)
        reply = conn.read()
        assert reply["error"]["code"] == "frame_too_large"
    except (ssl.SSLError, ConnectionError, EOFError):
        pass  # the daemon closed while we were still sending
    conn.close()
    assert whoami_on_a_new_connection(daemon)["identity"] == "bob"
    assert daemon.tracebacks() == []


def test_a_frame_of_random_bytes_gets_bad_request_and_the_connection_lives(
        daemon: Daemon) -> None:
    """A well-framed payload of random bytes is bad_request; the same connection still serves."""
    rng = random.Random(20261128)
    conn = Conn(daemon)
    conn.hello()
    payload = bytes([0xc1]) + rng.randbytes(500)  # 0xc1 is never valid msgpack
    conn.send_raw(struct.pack("!I", len(payload)) + payload)
    reply = conn.read()
    assert reply["id"] is None and reply["error"]["code"] == "bad_request"
    assert conn.call("whoami")["identity"] == "alice"
    conn.close()
    assert daemon.tracebacks() == []


def test_unframed_random_bytes_get_frame_too_large(daemon: Daemon) -> None:
    """Random bytes whose first four read as a huge length: frame_too_large; the daemon lives on."""
    rng = random.Random(7)
    conn = Conn(daemon)
    conn.hello()
    conn.send_raw(b"\xff" + rng.randbytes(4095))
    assert conn.read()["error"]["code"] == "frame_too_large"
    conn.close()
    assert whoami_on_a_new_connection(daemon)["identity"] == "bob"


@pytest.mark.parametrize("mistake", ["oversize", "random", "version"])
def test_a_fatal_mistake_is_answered_then_the_connection_closes(daemon: Daemon,
                                                                mistake: str) -> None:
    """After frame_too_large or a wrong-version hello the daemon closes the connection at once."""
    conn = Conn(daemon)
    if mistake == "version":
        conn.send({"id": 1, "method": "hello", "params": {"version": PROTOCOL_VERSION + 1}})
        expected = "unsupported_version"
    else:
        conn.hello()
        conn.send_raw(struct.pack("!I", 2 << 20) if mistake == "oversize"
                      else b"\xff" + random.Random(3).randbytes(100))
        expected = "frame_too_large"
    assert conn.read()["error"]["code"] == expected
    assert conn.closed_within(2), "the daemon answered but did not close"


def test_a_thousand_random_frames_each_get_a_clear_error(daemon: Daemon) -> None:
    """1,000 frames of random bytes, pipelined, get 1,000 client-error replies and no close."""
    rng = random.Random(1000)
    conn = Conn(daemon, timeout=30)
    conn.hello()
    frames = []
    for _ in range(1000):
        payload = rng.randbytes(rng.randrange(0, 200))
        frames.append(struct.pack("!I", len(payload)) + payload)
    conn.send_raw(b"".join(frames))
    codes = [conn.read()["error"]["code"] for _ in range(1000)]
    assert set(codes) <= CLIENT_ERRORS, set(codes)
    assert conn.call("whoami")["identity"] == "alice"
    conn.close()
    assert whoami_on_a_new_connection(daemon)["identity"] == "bob"
    assert daemon.tracebacks() == []


def test_jwclient_still_works_after_the_abuse(daemon: Daemon) -> None:
    """After every test above, the real jwclient still gets its answer."""
    result = daemon.jwclient("whoami", identity="alice", check=True)
    assert result.stdout.decode().split() == ["identity:", "alice", "role:", "user"]
    assert daemon.tracebacks() == []


# -- timeouts ----------------------------------------------------------------------------------

HANDSHAKE, IDLE, FRAME = 1.0, 2.0, 1.0


@pytest.fixture(scope="module")
def strict_daemon(test_pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with short timeouts and a small frame limit."""
    d = Daemon(test_pki, tmp_path_factory.mktemp("strict") / "state",
               "--handshake-timeout", str(HANDSHAKE), "--idle-timeout", str(IDLE),
               "--frame-timeout", str(FRAME), "--max-frame", "2048").start()
    yield d
    d.stop()


def timeouts_logged(daemon: Daemon, reason: str, identity: str) -> int:
    return len(re.findall(rf"connection\.timeout reason={reason} identity={identity}\b",
                          daemon.log()))


def test_hello_reports_the_configured_frame_limit(strict_daemon: Daemon) -> None:
    """--max-frame reaches the daemon: hello reports it and a bigger frame is refused."""
    conn = Conn(strict_daemon)
    assert conn.hello()["max_frame"] == 2048
    conn.send_raw(struct.pack("!I", 2049))
    assert conn.read()["error"]["code"] == "frame_too_large"
    conn.close()


def test_a_connection_that_never_handshakes_is_closed(strict_daemon: Daemon) -> None:
    """A TCP connection that never starts TLS is closed after --handshake-timeout."""
    with socket.create_connection(("127.0.0.1", strict_daemon.port), timeout=10) as raw:
        start = time.monotonic()
        try:
            data = raw.recv(1)
        except ConnectionError:
            data = b""
        elapsed = time.monotonic() - start
    assert data == b""
    assert HANDSHAKE * 0.8 <= elapsed < HANDSHAKE + 5
    wait_for(lambda: "connection.timeout reason=handshake" in strict_daemon.log(), 5,
             what="the handshake timeout in the log")


def test_an_idle_authenticated_connection_is_closed(strict_daemon: Daemon) -> None:
    """After hello and nothing more, the connection is closed after --idle-timeout."""
    conn = Conn(strict_daemon, "auditor")
    conn.hello()
    start = time.monotonic()
    assert conn.closed_within(IDLE + 5)
    assert time.monotonic() - start >= IDLE * 0.8
    wait_for(lambda: timeouts_logged(strict_daemon, "idle", "auditor"), 5,
             what="the idle timeout in the log")


def test_a_dripping_client_is_cut_off_although_bytes_keep_arriving(
        strict_daemon: Daemon) -> None:
    """One byte every 0.2 s, never a whole frame: cut --frame-timeout after the first byte."""
    conn = Conn(strict_daemon, "bob")
    conn.hello()
    payload = msgpack.packb({"id": 9, "method": "whoami", "params": {"pad": "x" * 200}})
    drip = struct.pack("!I", len(payload)) + payload
    sent, start, closed = 0, time.monotonic(), False
    while sent < len(drip) - 1 and time.monotonic() - start < FRAME + 5:
        try:
            conn.send_raw(drip[sent:sent + 1])
        except (ssl.SSLError, ConnectionError):
            closed = True
            break
        sent += 1
        # The pacing delay between bytes doubles as the check for a close.
        readable, _, _ = select.select([conn.sock], [], [], 0.2)
        if readable and conn.closed_within(0.01):
            closed = True
            break
    assert closed, f"still open after {sent} bytes"
    assert sent >= 4, "cut off before bytes kept arriving"
    assert time.monotonic() - start < FRAME + 3
    wait_for(lambda: timeouts_logged(strict_daemon, "partial frame", "bob"), 5,
             what="the partial-frame timeout in the log")
    assert timeouts_logged(strict_daemon, "idle", "bob") == 0


def test_timeouts_leave_no_traceback(strict_daemon: Daemon) -> None:
    """The timeouts above are routine: no Traceback in the log, and new clients are served."""
    assert whoami_on_a_new_connection(strict_daemon, "alice")["identity"] == "alice"
    assert strict_daemon.tracebacks() == []


# -- the connection cap ------------------------------------------------------------------------


def test_connections_over_the_cap_are_refused_while_others_keep_working(
        make_daemon: Any) -> None:
    """With --max-connections 2 a third client is refused; the two keep working; a freed slot is reused."""
    d = make_daemon("--max-connections", "2")
    first, second = Conn(d, "alice"), Conn(d, "bob")
    first.hello()
    second.hello()
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        third = Conn(d, "auditor")
        third.hello()  # TLS 1.3 may let the handshake "finish" before the close shows
    assert "connection.refused reason=cap" in d.log()
    assert first.call("whoami")["identity"] == "alice"
    assert second.call("whoami")["identity"] == "bob"
    first.close()

    def admitted() -> bool:
        try:
            return whoami_on_a_new_connection(d, "auditor")["identity"] == "auditor"
        except (ssl.SSLError, ConnectionError, EOFError):
            return False

    wait_for(admitted, 10, what="a freed slot to admit a new client")
    assert second.call("whoami")["identity"] == "bob"
    second.close()
    assert d.tracebacks() == []
