"""One synchronous connection to a daemon on the stdlib: a TLS 1.3 socket, frames, the
hello, and replies matched to requests by id, so many requests may be in flight at once.

No Twisted: ``jwclient`` pays for ``ssl``, ``socket`` and ``msgpack`` only.  The frame
format, limits, hello and TLS policy are the wire layer's, as the daemon applies them.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any

from jobworker.client import leafcheck
from jobworker.client.endpoint import ClientConfig, ClientError, parse_server
from jobworker.wire import codec
from jobworker.wire.errors import (
    ConnectionLost,
    FrameTooLarge,
    JobWorkerError,
    error_from_wire,
)
from jobworker.wire.frames import CLIENT_MAX_FRAME, DEFAULT_MAX_FRAME, PREFIX
from jobworker.wire.hello import hello_params

#: Bytes asked of the socket at once: a log chunk (256 KiB) in few reads.
READ_SIZE = 256 * 1024


class Pending:
    """One request in flight: its chunk handler, then its result or error."""

    __slots__ = ("on_chunk", "done", "result", "error")

    def __init__(self, on_chunk: Callable[[Any], None] | None) -> None:
        self.on_chunk = on_chunk
        self.done = False
        self.result: Any = None
        self.error: JobWorkerError | None = None


def tls_context(config: ClientConfig) -> ssl.SSLContext:
    """TLS 1.3 only, the server verified against ``config.ca`` by name or address, and our
    own certificate checked fit for clientAuth before it is ever presented."""
    try:
        with open(config.cert, "rb") as f:
            own = leafcheck.pem_certificates(f.read())
    except OSError as e:
        raise ClientError(f"cannot read certificate {config.cert}: {e.strerror}") from None
    except leafcheck.BadCertificate:
        own = []
    if not own:
        raise ClientError(f"certificate {config.cert} is not a PEM certificate")
    problem = leafcheck.leaf_problem(own[0], leafcheck.CLIENT_AUTH)
    if problem:
        raise ClientError(f"{config.cert}: {problem}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(config.ca)
    except OSError as e:
        raise ClientError(f"cannot read CA file {config.ca}: {e.strerror}") from None
    except ssl.SSLError:
        raise ClientError(f"CA file {config.ca} holds no PEM certificate") from None
    try:
        ctx.load_cert_chain(config.cert, config.key)
    except OSError as e:
        if isinstance(e, ssl.SSLError):
            raise ClientError(f"private key {config.key} does not match certificate "
                              f"{config.cert}, or is not an unencrypted PEM key") from None
        raise ClientError(f"cannot read private key {config.key}: {e.strerror}") from None
    return ctx


def handshake_reason(e: Exception) -> str:
    """OpenSSL's words for a failed handshake (or an alert just after it), made short."""
    if isinstance(e, ssl.SSLCertVerificationError):
        message = e.verify_message or ""
        if "mismatch" in message:
            host = message.rsplit("valid for ", 1)[-1].rstrip(".")
            return f"server certificate does not match {host}"
        if "purpose" in message:  # OpenSSL checks an EKU that is present; we, a missing one
            return "server certificate lacks the serverAuth extended key usage"
        return f"server certificate verify failed: {message}"
    text = str(getattr(e, "reason", None) or e).lower()
    for needle, words in (
        ("certificate required", "server requires a client certificate"),
        ("unknown ca", "server does not trust our certificate (unknown CA)"),
        ("certificate expired", "server refused our certificate: expired"),
        ("certificate revoked", "server refused our certificate: revoked"),
        ("unsupported certificate", "server refused our certificate (unsupported purpose)"),
        ("bad certificate", "server refused our certificate"),
        ("protocol version", "TLS version mismatch (TLS 1.3 required)"),
    ):
        if needle in text:
            return words
    return str(e)


class Session:
    """A connected, hello'd session.  ``send`` may be called many times before replies
    are read; ``wait_for`` reads frames, dispatching each to its request, until one ends.

    ``wake_fd``/``on_wake``: a descriptor (``signal.set_wakeup_fd``'s) watched beside the
    socket while waiting, so a signal is acted on between frames, never inside one.
    """

    def __init__(self, sock: ssl.SSLSocket, server: str) -> None:
        self.server = server
        self.info: dict[str, Any] = {}
        self.max_send = DEFAULT_MAX_FRAME
        self.wake_fd: int | None = None
        self.on_wake: Callable[[], None] | None = None
        self._sock = sock
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._lost: ConnectionLost | None = None
        sock.setblocking(False)

    @classmethod
    def open(cls, config: ClientConfig, timeout: float = 10.0) -> Session:
        """Connect, complete the TLS handshake and the hello, within ``timeout`` each."""
        host, port = parse_server(config.server)
        ctx = tls_context(config)
        try:
            # ASCII bytes, here and for the server name: a str is encoded with the idna
            # codec, whose import costs more than the rest of a lookup.
            raw = socket.create_connection((_ascii(host), port), timeout=timeout)
        except socket.gaierror as e:
            raise ClientError(f"bad server address {config.server!r}: {e.strerror}") from None
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise ClientError(f"cannot connect to {config.server}: {reason}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=_ascii(host))
        except (ssl.SSLError, OSError) as e:
            raw.close()
            raise ClientError(f"{config.server}: TLS handshake failed "
                              f"({handshake_reason(e)})") from None
        der = sock.getpeercert(binary_form=True)
        problem = leafcheck.leaf_problem(der, leafcheck.SERVER_AUTH) if der else "no certificate"
        if problem:
            sock.close()
            raise ClientError(f"{config.server}: TLS handshake failed (server {problem})")
        session = cls(sock, config.server)
        try:
            rid = session.send("hello", hello_params())
            if not session.wait_for(rid, timeout):
                session.close()
                raise ClientError(f"{config.server}: no answer within {timeout:g}s")
            info = session.take(rid)
        except ConnectionLost as e:
            session.close()
            raise ClientError(f"{config.server}: TLS handshake or hello failed "
                              f"({e.message.replace('connection lost: ', '')})") from None
        except JobWorkerError as e:
            session.close()
            raise ClientError(f"{config.server}: {e.message}") from None
        session.info = info if isinstance(info, dict) else {}
        max_frame = session.info.get("max_frame")
        if type(max_frame) is int and max_frame > 0:
            session.max_send = max_frame
        return session

    # -- requests ---------------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None,
             on_chunk: Callable[[Any], None] | None = None) -> int:
        """Send one request at once; its reply is read later (``wait_for``)."""
        if self._lost is not None:
            raise ConnectionLost(self._lost.message)
        rid = next(self._ids)
        payload = codec.encode({"id": rid, "method": method, "params": params or {}})
        if len(payload) > self.max_send:
            raise FrameTooLarge(f"refusing to send a {len(payload)}-byte frame (the "
                                f"daemon takes at most {self.max_send})")
        self._pending[rid] = Pending(on_chunk)
        self._write(PREFIX.pack(len(payload)) + payload)
        return rid

    def done(self, rid: int) -> bool:
        entry = self._pending.get(rid)
        return entry is None or entry.done

    def in_flight(self) -> int:
        return sum(1 for p in self._pending.values() if not p.done)

    def wait_for(self, rid: int, timeout: float | None = None) -> bool:
        """Read frames until request ``rid`` has its answer (True), or ``timeout``
        seconds pass with no frame at all (False)."""
        while not self.done(rid):
            if not self.read_frame(timeout):
                return False
        return True

    def take(self, rid: int) -> Any:
        """The result of an answered request, or raise its error."""
        entry = self._pending.pop(rid)
        if entry.error is not None:
            raise entry.error
        return entry.result

    def raise_errors(self) -> None:
        """Take every answered request; raise the first error among them."""
        first: JobWorkerError | None = None
        for rid in [rid for rid, entry in self._pending.items() if entry.done]:
            answered = self._pending.pop(rid)
            if first is None:
                first = answered.error
        if first is not None:
            raise first

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_chunk: Callable[[Any], None] | None = None) -> Any:
        rid = self.send(method, params, on_chunk)
        self.wait_for(rid)
        return self.take(rid)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    # -- frames -----------------------------------------------------------------------------

    def read_frame(self, timeout: float | None = None) -> bool:
        """Read and dispatch one frame; False when ``timeout`` passed without one."""
        while True:
            if len(self._buf) >= 4:
                (size,) = PREFIX.unpack_from(self._buf)
                if size > CLIENT_MAX_FRAME:
                    raise self._lose(f"server sent a {size}-byte frame, over the limit")
                if len(self._buf) >= 4 + size:
                    payload = bytes(self._buf[4:4 + size])
                    del self._buf[:4 + size]
                    self._dispatch(payload)
                    return True
            if not self._fill(timeout):
                return False

    def _dispatch(self, payload: bytes) -> None:
        try:
            frame = codec.decode_reply(payload, CLIENT_MAX_FRAME)
        except JobWorkerError as e:
            raise self._lose(f"undecodable frame from server: {e.message}") from None
        if not isinstance(frame, dict):
            raise self._lose("server sent a frame that is not a map")
        rid = frame.get("id")
        if rid is None and "error" in frame:  # about the connection: everything in flight
            error = _error_of(frame["error"])
            for waiting in self._pending.values():
                if not waiting.done:
                    waiting.done, waiting.error = True, error
            return
        entry = self._pending.get(rid) if type(rid) is int else None
        if entry is None or entry.done:
            return
        if "chunk" in frame:
            if entry.on_chunk is not None:
                entry.on_chunk(frame["chunk"])
            return
        entry.done = True
        if "error" in frame:
            entry.error = _error_of(frame["error"])
        else:
            entry.result = frame.get("result")

    def _fill(self, timeout: float | None) -> bool:
        while True:
            try:
                data = self._sock.recv(READ_SIZE)
            except ssl.SSLWantReadError:
                if not self._wait(timeout, write=False):
                    return False
                continue
            except ssl.SSLWantWriteError:
                self._wait(None, write=True)
                continue
            except (ssl.SSLError, OSError) as e:
                raise self._lose(f"connection lost: {handshake_reason(e)}") from None
            if not data:
                raise self._lose("connection lost: the server closed the connection")
            self._buf += data
            return True

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except (ssl.SSLWantWriteError, BlockingIOError):
                self._wait(None, write=True)
                continue
            except ssl.SSLWantReadError:
                self._wait(None, write=False)
                continue
            except (ssl.SSLError, OSError) as e:
                raise self._lose(f"connection lost: {handshake_reason(e)}") from None
            view = view[sent:]

    def _wait(self, timeout: float | None, write: bool) -> bool:
        """Until the socket is ready (True) or ``timeout`` passes (False); a byte on
        ``wake_fd`` runs ``on_wake`` on the way."""
        reads: list[Any] = [] if write else [self._sock]
        if self.wake_fd is not None:
            reads.append(self.wake_fd)
        ready, writable, _ = select.select(reads, [self._sock] if write else [], [], timeout)
        if self.wake_fd is not None and self.wake_fd in ready:
            try:
                os.read(self.wake_fd, 512)
            except BlockingIOError:
                pass
            if self.on_wake is not None:
                self.on_wake()
        return bool(ready or writable)

    def _lose(self, message: str) -> ConnectionLost:
        """Fail everything in flight with ``message``; the error to raise."""
        error = ConnectionLost(message)
        self._lost = error
        for entry in self._pending.values():
            if not entry.done:
                entry.done, entry.error = True, ConnectionLost(message)
        self.close()
        return error


def _ascii(host: str) -> str:
    """``host`` as ASCII bytes when it is (parse_server allows no other), typed as str for
    the stdlib's stubs, which do not list the bytes both calls accept."""
    data: Any = host.encode("ascii")
    return data  # type: ignore[no-any-return]


def _error_of(value: Any) -> JobWorkerError:
    err = value if isinstance(value, dict) else {}
    return error_from_wire(str(err.get("code", "internal")), str(err.get("message", "")))
