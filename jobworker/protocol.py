"""Framing and request correlation: the Twisted layer under both daemon and client.

A frame is a 4-byte big-endian length and one msgpack map.  Reassembly is linear in
the bytes received (Twisted's ``IntNStringReceiver`` copies its whole buffer for every
piece that arrives).  Dispatch lives in ``server.py``; correlation of replies to
requests lives here in ``RPCClientProtocol``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from jobworker import codec
from jobworker.errors import ConnectionLost, FrameTooLarge, JobWorkerError, error_from_wire

_PREFIX = struct.Struct("!I")

#: A client accepts larger frames than a server: log chunks are up to 256 KiB.
CLIENT_MAX_FRAME = 1024 * 1024


class FrameProtocol(Int32StringReceiver):
    """``Int32StringReceiver`` with a linear-time buffer and a cap we choose."""

    MAX_LENGTH = codec.DEFAULT_MAX_FRAME
    #: Largest payload we will send; a bigger one is a bug on our side.
    max_send = CLIENT_MAX_FRAME

    _buffer: bytearray
    _refusing = False
    #: A frame at least this long that is not complete yet is gathered as a list of the
    #: pieces that arrive and joined once when whole: one copy of a 256 KiB log chunk
    #: instead of two, and no bytearray regrowing (and reallocating) under it.
    LARGE_FRAME = 64 * 1024
    _pieces: list[bytes | memoryview] | None = None
    _gathered = 0  # bytes of the large frame's payload in _pieces
    _missing = 0  # bytes of it still to come
    # TLS transports carry more than ITransport declares (getPeerCertificate,
    # abortConnection, producers): typed loosely rather than cast at every use.
    transport: Any

    def makeConnection(self, transport: Any) -> None:
        self._buffer = bytearray()
        super().makeConnection(transport)

    #: Replies made while handling one read are gathered and written together (one TLS
    #: record instead of one per reply), up to this many bytes at a time; beyond it they
    #: go out at once, so a paused transport still pushes back on a streaming producer.
    OUTBOX_LIMIT = 64 * 1024
    _outbox: list[bytes] | None = None
    _outbox_size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._outbox is not None:  # re-entered from a callback: already gathering
            self._receive(data)
            return
        self._outbox = []
        try:
            self._receive(data)
        finally:
            self.flush()

    def flush(self) -> None:
        """Write what has been gathered, and stop gathering."""
        out, self._outbox, self._outbox_size = self._outbox, None, 0
        if out and self.transport is not None:
            self.transport.writeSequence(out)

    def _receive(self, data: bytes) -> None:
        if self._refusing:
            return
        progressed = False
        if self._pieces is not None:
            if len(data) < self._missing:
                self._pieces.append(data)
                self._gathered += len(data)
                self._missing -= len(data)
                self.buffer_changed(4 + self._gathered, False)
                return
            pieces, self._pieces = self._pieces, None
            frame: bytes | bytearray
            with memoryview(data) as view:
                pieces.append(view[:self._missing])
                frame = b"".join(pieces)
                data = bytes(view[self._missing:]) if len(data) > self._missing else b""
            self._gathered = self._missing = 0
            progressed = True
            self.stringReceived(frame)
            if self.transport is None or self.transport.disconnecting:
                self.buffer_changed(0, True)
                return
        buf = self._buffer
        buf += data
        offset = 0
        size = len(buf)
        while size - offset >= 4:
            (length,) = _PREFIX.unpack_from(buf, offset)
            if length > self.MAX_LENGTH:
                # The stream cannot be resynchronised: drop the rest of it.
                self._refusing = True
                del buf[:]
                self.lengthLimitExceeded(length)
                return
            end = offset + 4 + length
            if end > size:
                if length >= self.LARGE_FRAME:
                    self._pieces = [bytes(buf[offset + 4:])]
                    self._gathered = size - offset - 4
                    self._missing = length - self._gathered
                    del buf[:]
                    self.buffer_changed(4 + self._gathered, progressed or offset > 0)
                    return
                break
            # A bytearray slice is one copy, and several times cheaper than bytes() of a
            # memoryview slice for the small frames that dominate.
            frame = buf[offset + 4:end]
            offset = end
            self.stringReceived(frame)
            if self.transport is None or self.transport.disconnecting:
                break
        # Deleting a prefix of a bytearray is cheap: CPython moves its start pointer.
        del buf[:offset]
        self.buffer_changed(len(buf), progressed or offset > 0)

    def buffer_changed(self, pending: int, progressed: bool) -> None:
        """Hook: ``pending`` bytes of an incomplete frame are buffered; ``progressed``
        says whether at least one whole frame was taken off the buffer."""

    def send_frame(self, value: dict[str, Any]) -> None:
        self.send_encoded(codec.encode(value))

    def send_encoded(self, *parts: bytes) -> None:
        """Send one frame whose payload is ``parts`` joined: already-encoded msgpack."""
        size = sum(map(len, parts))
        if size > self.max_send:
            raise FrameTooLarge(f"refusing to send a {size}-byte frame")
        if self._outbox is None:
            self.transport.writeSequence([_PREFIX.pack(size), *parts])
            return
        self._outbox.append(_PREFIX.pack(size))
        self._outbox.extend(parts)
        self._outbox_size += 4 + size
        if self._outbox_size >= self.OUTBOX_LIMIT:
            out, self._outbox, self._outbox_size = self._outbox, [], 0
            self.transport.writeSequence(out)


class RPCClientProtocol(FrameProtocol):
    """Client end: numbers requests, matches replies, fails everything pending on loss."""

    MAX_LENGTH = CLIENT_MAX_FRAME
    max_send = codec.DEFAULT_MAX_FRAME
    log = Logger()

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Deferred[Any], Callable[[Any], None] | None]] = {}
        self._lost: Failure | None = None
        self.on_connection_lost: list[Callable[[Failure], None]] = []

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_chunk: Callable[[Any], None] | None = None) -> Deferred[Any]:
        """Send one request; the Deferred fires with its result or its error.

        ``on_chunk`` receives each streamed chunk before the final reply.
        """
        if self._lost is not None:
            return _failed(self._lost)
        rid = next(self._ids)
        d: Deferred[Any] = Deferred(lambda _: self._cancel(rid))
        self._pending[rid] = (d, on_chunk)
        try:
            self.send_frame({"id": rid, "method": method, "params": params or {}})
        except JobWorkerError:
            del self._pending[rid]
            raise
        return d

    def _cancel(self, rid: int) -> None:
        self._pending.pop(rid, None)

    def stringReceived(self, string: bytes | bytearray) -> None:
        try:
            frame = codec.decode_reply(string, self.MAX_LENGTH)
        except JobWorkerError as e:
            self._protocol_error(f"undecodable frame from server: {e.message}")
            return
        if not isinstance(frame, dict):
            self._protocol_error("server sent a frame that is not a map")
            return
        rid = frame.get("id")
        if rid is None and "error" in frame:
            # A connection-level error: it applies to everything in flight.
            err = frame["error"] if isinstance(frame["error"], dict) else {}
            self._fail_all(error_from_wire(str(err.get("code", "internal")),
                                           str(err.get("message", ""))))
            return
        entry = self._pending.get(rid) if isinstance(rid, int) else None
        if entry is None or not isinstance(rid, int):
            self.log.debug("reply to unknown request {rid!r}", rid=rid)
            return
        d, on_chunk = entry
        if "chunk" in frame:
            if on_chunk is not None:
                try:
                    on_chunk(frame["chunk"])
                except Exception:
                    del self._pending[rid]
                    d.errback(Failure())
            return
        del self._pending[rid]
        if "error" in frame:
            err = frame["error"] if isinstance(frame["error"], dict) else {}
            d.errback(error_from_wire(str(err.get("code", "internal")),
                                      str(err.get("message", ""))))
        else:
            d.callback(frame.get("result"))

    def lengthLimitExceeded(self, length: int) -> None:
        self._protocol_error(f"server sent a {length}-byte frame, over the limit")

    def _protocol_error(self, message: str) -> None:
        self._fail_all(ConnectionLost(message))
        self.transport.loseConnection()

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for d, _ in pending.values():
            d.errback(Failure(error))

    def connectionLost(self, reason: Failure = Failure(ConnectionLost())) -> None:
        self._lost = reason
        message = reason.getErrorMessage() if reason is not None else "connection closed"
        self._fail_all(ConnectionLost(f"connection lost: {message}"))
        for hook in self.on_connection_lost:
            hook(reason)


def _failed(reason: Failure) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(ConnectionLost(f"connection lost: {reason.getErrorMessage()}")))
    return d
