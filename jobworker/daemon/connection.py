"""One client connection: its timers, the hello, pipelined requests in one guard, replies.

Every frame is decoded, checked and handed to the server's dispatch inside one guard: no
exception escapes ``stringReceived``, a client's mistake becomes a typed error frame and
never a traceback in the log, and a bug becomes a logged ``internal`` error.
"""

from __future__ import annotations

from types import CoroutineType
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet import interfaces
from twisted.internet.base import DelayedCall
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.daemon.address import host_port
from jobworker.daemon.authz import Authorizer, Policy, Principal
from jobworker.daemon.call import Call
from jobworker.daemon.fanout import StreamFanout
from jobworker.daemon.limits import Limits
from jobworker.daemon.metrics import Metrics
from jobworker.rpc.framing import FrameProtocol
from jobworker.wire import codec
from jobworker.wire.codec import Encoded
from jobworker.wire.errors import (
    BadRequest,
    Forbidden,
    FrameTooLarge,
    JobWorkerError,
    Unavailable,
    UnsupportedVersion,
)
from jobworker.wire.frames import parse_request, request_id_of
from jobworker.wire.hello import hello_first
from jobworker.wire.identity import PeerIdentity, identity_of


class Server(Protocol):
    """What a connection needs of the daemon's RPC server (``RPCServer``)."""

    reactor: Any
    authz: Authorizer
    metrics: Metrics

    def dispatch(self, call: Call, params: dict[str, Any]) -> Any:
        """Validate, authorize and run one request: its result, or a coroutine."""

    def connection_closed(self, proto: RPCServerProtocol) -> None:
        """``proto`` has ended."""

    def handshake_done(self, proto: RPCServerProtocol) -> bool:
        """``proto`` has authenticated: whether it may take an authenticated slot."""


def _cancel(timer: DelayedCall | None) -> None:
    """Cancel ``timer`` if it is still pending; callers then drop their reference."""
    if timer is not None and timer.active():
        timer.cancel()


@implementer(interfaces.IHandshakeListener)
class RPCServerProtocol(FrameProtocol):
    """One client connection: timers, the hello, pipelined requests, and its streams
    (``StreamFanout``) registered as the transport's push producer."""

    log = Logger()

    def __init__(self, server: Server, limits: Limits) -> None:
        self.server = server
        self.limits = limits
        self.MAX_LENGTH = limits.max_frame
        self.peer: PeerIdentity | None = None
        self.who: Principal | None = None
        #: The policy ``who`` was worked out under; another one (a reload) means again.
        self._policy: Policy | None = None
        self._hello = False
        self._in_flight: dict[int, Deferred[Any]] = {}
        self._timer: DelayedCall | None = None
        self._frame_timer: DelayedCall | None = None
        self._idle_since = 0.0
        self.streams = StreamFanout(self.hold, self.release)
        self._closing = False
        self.connected_and_open = False
        #: Given an authenticated slot after the handshake (see Server.handshake_done).
        self.admitted = False
        #: For the line logged when the connection ends (``connection.closed``).
        self.requests = 0
        self._opened = 0.0
        self._peer_text = "?"
        #: Why we ended the connection, when we did (else the reason it was lost says).
        self._why: str | None = None

    # -- connection life cycle ------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_and_open = True
        self._opened = self.server.reactor.seconds()
        self._peer_text = host_port(self.transport.getPeer())
        self._arm(self.limits.handshake_timeout, "handshake")
        self.transport.registerProducer(self.streams, True)
        # Replies and followed log lines are small writes: with Nagle on, one written
        # while the previous is unacknowledged waits for the peer's delayed ACK (~40 ms).
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):  # not TCP (a unix: endpoint, a test transport)
            pass

    def handshakeCompleted(self) -> None:
        cert = self.transport.getPeerCertificate()
        if cert is None:  # cannot happen with VERIFY_FAIL_IF_NO_PEER_CERT; be safe
            self.transport.abortConnection()
            return
        self._cancel_timer()  # the handshake timer
        self.peer = identity_of(cert.to_cryptography())
        self.server.metrics.handshake_done("ok")
        self.admitted = self.server.handshake_done(self)
        if not self.admitted:  # several handshakes raced for the last slot
            self.log.warn("connection.refused reason=cap identity={identity} peer={addr}",
                          identity=self.peer.name, addr=self._peer_text)
            self._why = "refused"
            self.transport.abortConnection()
            return
        self._policy = self.server.authz.policy
        self.who = self.server.authz.principal(self.peer)
        self.log.info("connection.open identity={identity} role={role} peer={addr}",
                      identity=self.peer.name, role=self.who.role, addr=self._peer_text)
        self._arm_idle()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        why = self._why or _why_lost(reason)
        if self.peer is None:
            # Refused handshakes (bad, expired, revoked certificates) end here: say why.
            self.log.info("connection.handshake_failed peer={addr} reason={reason}",
                          addr=self._peer_text, reason=reason.getErrorMessage())
            self.server.metrics.handshake_done(
                "timeout" if why == "handshake_timeout"
                else "tls_error" if why == "tls_error" else "closed")
        else:
            duration = self.server.reactor.seconds() - self._opened
            self.log.info("connection.closed identity={identity} peer={addr} "
                          "duration={duration}s requests={requests} why={why}",
                          identity=self.peer.name, addr=self._peer_text,
                          duration=round(duration, 3), requests=self.requests, why=why,
                          detail=reason.getErrorMessage())
            if self.admitted:
                self.server.metrics.connection_closed(why)
        self.connected_and_open = False
        self._cancel_timer()
        _cancel(self._frame_timer)
        self._frame_timer = None
        pending, self._in_flight = self._in_flight, {}
        for d in pending.values():
            d.cancel()
        self.streams.close()
        self.server.connection_closed(self)

    # -- timers: reset only by complete frames -----------------------------------------

    def _arm(self, seconds: float, why: str) -> None:
        self._cancel_timer()
        self._timer = self.server.reactor.callLater(seconds, self._timed_out, why)

    def _arm_idle(self) -> None:
        """Note activity now.  One idle timer runs per connection and re-checks when it
        fires, rather than being cancelled and rescheduled on every request."""
        if self.peer is None:
            return
        self._idle_since = self.server.reactor.seconds()
        if self._timer is None:
            self._timer = self.server.reactor.callLater(self.limits.idle_timeout,
                                                        self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        if self._in_flight:  # not idle while a request is in flight: look again later
            remaining = self.limits.idle_timeout
        else:
            remaining = self._idle_since + self.limits.idle_timeout \
                - self.server.reactor.seconds()
        if remaining > 0:
            self._timer = self.server.reactor.callLater(remaining, self._check_idle)
        else:
            self._timed_out("idle")

    def _cancel_timer(self) -> None:
        _cancel(self._timer)
        self._timer = None

    def _timed_out(self, why: str) -> None:
        self._why = _TIMEOUTS.get(why, "timeout")
        self._cancel_timer()
        _cancel(self._frame_timer)
        self._frame_timer = None
        self.log.info("connection.timeout reason={reason} identity={identity}",
                      reason=why, identity=self.peer.name if self.peer else None)
        self.transport.abortConnection()

    def buffer_changed(self, pending: int, progressed: bool) -> None:
        if progressed:  # once per read, however many requests it held
            self._arm_idle()
            _cancel(self._frame_timer)
            self._frame_timer = None
        if pending and self._frame_timer is None:
            self._frame_timer = self.server.reactor.callLater(
                self.limits.frame_timeout, self._timed_out, "partial frame")
        elif not pending:
            _cancel(self._frame_timer)
            self._frame_timer = None

    def ciphertext_received(self) -> None:
        """From the TLS layer (``PromptTLSProtocol``), before it decrypts what arrived.

        Bytes that do not complete a TLS record never reach ``dataReceived``: a peer
        dripping one would otherwise meet only the idle timeout.  They start the frame
        timer as a partial frame would; a whole frame arriving cancels it as usual."""
        if self.peer is not None and self._frame_timer is None and not self._closing:
            self._frame_timer = self.server.reactor.callLater(
                self.limits.frame_timeout, self._timed_out, "partial frame")

    # -- frames ---------------------------------------------------------------------

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.info("request.too_large length={length} limit={limit}",
                      length=length, limit=self.MAX_LENGTH)
        self._why = "frame_too_large"
        self._send_error(None, FrameTooLarge(
            f"frame of {length} bytes is over the {self.MAX_LENGTH}-byte limit"))
        self._close()

    def stringReceived(self, string: bytes | bytearray) -> None:
        if self.peer is None or self.who is None:  # pre-handshake data never reaches us
            self.transport.abortConnection()
            return
        self.requests += 1
        value = None
        try:
            value = codec.decode(string, self.MAX_LENGTH)
            request = parse_request(value)
            if request.id in self._in_flight:
                raise BadRequest(f"request id {request.id} is already in flight")
            if not self._hello:
                if request.method != "hello":
                    raise hello_first()
            elif len(self._in_flight) >= self.limits.max_in_flight:
                raise Unavailable(f"more than {self.limits.max_in_flight} requests in flight")
        except JobWorkerError as e:
            self._send_error(request_id_of(value), e)
            if isinstance(e, UnsupportedVersion):  # no hello first: docs/protocol.md
                self._why = "protocol_error"
                self._close()
                return
            self._arm_idle()
            return
        except Exception:
            self.log.failure("request.decode_bug")
            self._send_error(request_id_of(value), JobWorkerError("internal error"))
            return
        # The policy may be reloaded (SIGHUP) while we are connected: a new policy object
        # means the caller's role is worked out again before this request is authorized.
        authz = self.server.authz
        if authz.policy is not self._policy:
            self._policy = authz.policy
            self.who = authz.principal(self.peer)
        call = Call(self, request.id, request.method, self.who, self.server.reactor.seconds())
        try:
            outcome = self.server.dispatch(call, request.params)
        except Exception:
            self._finished(Failure(), call)
            return
        if type(outcome) is CoroutineType:
            # Only methods that wait (stop, wait, logs) pay for a Deferred and a coroutine.
            d = Deferred.fromCoroutine(outcome)
            self._in_flight[request.id] = d
            d.addBoth(self._finished, call)
        else:
            self._finished(outcome, call, False)

    def _finished(self, result: Any, call: Call, later: bool = True) -> None:
        """Reply to ``call``; ``later``: it finished after the read that brought it, so
        its reply is activity of its own for the idle timer."""
        if later:
            self._in_flight.pop(call.id, None)
        code: str | None = None
        if isinstance(result, Failure):
            if result.check(CancelledError) or not self.connected_and_open:
                self.server.metrics.request_done(
                    call.method, self.server.reactor.seconds() - call.began, "cancelled")
                return None
            error = result.value
            if not isinstance(error, JobWorkerError):
                self.log.failure("request.bug method={method}", result, method=call.method)
                error = JobWorkerError("internal error")
            code = error.code
            self._send_error(call.id, error)
            if isinstance(error, UnsupportedVersion):
                self._why = "protocol_error"
                self._close()
        elif self.connected_and_open:
            if call.method == "hello":
                self._hello = True
            try:
                if type(result) is Encoded:  # a cached record (status)
                    self.send_encoded(codec.reply_head(call.id), result)
                else:
                    self.send_frame({"id": call.id, "result": result})
            except JobWorkerError as e:
                code = e.code
                self._send_error(call.id, e)
        self.server.metrics.request_done(call.method,
                                         self.server.reactor.seconds() - call.began, code)
        if later:
            self._arm_idle()
        return None

    def revoke(self, reason: str) -> None:
        """The caller's rights are gone (its certificate revoked, its identity denied):
        every request in flight, streams included, ends with a forbidden error saying
        why, and the connection is closed."""
        if not self.connected_and_open or self._closing:
            return
        self.log.warn("connection.revoked identity={identity} reason={reason}",
                      identity=self.peer.name if self.peer else None, reason=reason)
        self._why = "revoked"
        pending, self._in_flight = self._in_flight, {}
        for rid in pending:
            self._send_error(rid, Forbidden(reason))
        for d in pending.values():
            d.cancel()  # a cancelled call sends nothing more
        self._close()

    def _close(self) -> None:
        """Close after what was written is flushed.  TLS will not shut down while a
        producer is registered, so the streams step down as the transport's producer
        first."""
        if self._closing:
            return
        self._closing = True
        self.streams.stop_all()
        self.flush()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _send_error(self, rid: int | None, error: JobWorkerError) -> None:
        if self.connected_and_open:
            self.send_frame({"id": rid, "error": error.to_wire()})


#: Our timers' names -> the ``why`` of the connection they end.
_TIMEOUTS = {"handshake": "handshake_timeout", "idle": "idle_timeout",
             "partial frame": "frame_timeout"}


def _why_lost(reason: Failure) -> str:
    """Why a connection we did not end ended: ``closed`` (cleanly, TLS shut down),
    ``lost`` (dropped: a reset, or TCP closed without TLS's close_notify), ``tls_error``
    or ``error``."""
    if reason.check(ConnectionDone):
        return "closed"
    if reason.check(SSL.Error):
        return "tls_error"
    if reason.check(ConnectionLost):
        return "lost"
    return "error"
