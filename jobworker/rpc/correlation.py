"""The client end of the RPC: numbers requests, matches replies to them, and fails
everything pending when the connection is lost."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from jobworker.rpc.framing import FrameProtocol
from jobworker.wire import codec
from jobworker.wire.errors import ConnectionLost, JobWorkerError, error_from_wire
from jobworker.wire.frames import CLIENT_MAX_FRAME, DEFAULT_MAX_FRAME


class RPCClientProtocol(FrameProtocol):
    """Client end: numbers requests, matches replies, fails everything pending on loss."""

    MAX_LENGTH = CLIENT_MAX_FRAME
    max_send = DEFAULT_MAX_FRAME
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
