"""The daemon's RPC endpoint: per-connection protocol, and the dispatch table of methods.

Every frame is decoded, validated, authorized and dispatched inside one guard: no
exception escapes ``stringReceived``, a client's mistake becomes a typed error frame
and never a traceback in the log, and a bug becomes a logged ``internal`` error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker import PROTOCOL_VERSION, codec
from jobworker.authz import Authorizer, Policy, Principal
from jobworker.codec import Encoded, Schema
from jobworker.errors import (
    BadRequest,
    Forbidden,
    FrameTooLarge,
    JobWorkerError,
    NotFound,
    Unavailable,
    UnknownMethod,
    UnsupportedVersion,
)
from jobworker.protocol import FrameProtocol
from jobworker.tls import PeerIdentity, identity_of

if TYPE_CHECKING:
    from jobworker.audit import AuditLog
    from jobworker.jobs import Job, JobManager


@dataclass(frozen=True)
class Limits:
    """Per-connection protections; all times in seconds."""

    max_frame: int = codec.DEFAULT_MAX_FRAME
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    #: Time allowed to finish a frame once its first byte arrived, so a client
    #: dripping bytes cannot hold a connection open while requests are in flight.
    frame_timeout: float = 30.0
    max_connections: int = 1024
    #: Requests one connection may have in flight at once.
    max_in_flight: int = 256


class Call:
    """One request in flight: who asked, and a way to stream chunks back."""

    __slots__ = ("protocol", "id", "method", "who")

    def __init__(self, protocol: RPCServerProtocol, rid: int, method: str,
                 who: Principal) -> None:
        self.protocol = protocol
        self.id = rid
        self.method = method
        self.who = who

    @property
    def connected(self) -> bool:
        return self.protocol.connected_and_open

    def send_chunk(self, chunk: Any) -> None:
        if type(chunk) is bytes:  # a log chunk: encoded around the bytes, not through them
            self.protocol.send_encoded(codec.encode_chunk_head(self.id, len(chunk)), chunk)
        elif type(chunk) is Encoded:
            self.protocol.send_encoded(codec.reply_head(self.id, "chunk"), chunk)
        else:
            self.protocol.send_frame({"id": self.id, "chunk": chunk})


@implementer(interfaces.IHandshakeListener, interfaces.IPushProducer)
class RPCServerProtocol(FrameProtocol):
    """One client connection: timers, the hello, pipelined requests, backpressure.

    It registers itself as the transport's single push producer and relays pause and
    resume to every stream in flight, so a slow reader makes the daemon stop reading
    log files instead of buffering them.
    """

    log = Logger()

    def __init__(self, server: RPCServer, limits: Limits) -> None:
        self.server = server
        self.limits = limits
        self.MAX_LENGTH = limits.max_frame
        self.peer: PeerIdentity | None = None
        self.who: Principal | None = None
        #: The policy ``who`` was worked out under; another one (a reload) means again.
        self._policy: Policy | None = None
        self._hello = False
        self._in_flight: dict[int, Deferred[Any]] = {}
        self._timer: Any = None
        self._frame_timer: Any = None
        self._idle_since = 0.0
        self.paused = False
        # Ordered, so resuming can rotate through the streams fairly.
        self._producers: dict[Any, None] = {}
        self._resume_from = 0
        self._closing = False
        self.connected_and_open = False

    # -- connection life cycle ------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_and_open = True
        self._arm(self.limits.handshake_timeout, "handshake")
        self.transport.registerProducer(self, True)
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
        self._policy = self.server.authz.policy
        self.who = self.server.authz.principal(self.peer)
        self.log.info("connection.open identity={identity} role={role} peer={addr}",
                      identity=self.peer.name, role=self.who.role,
                      addr=str(self.transport.getPeer()))
        self._arm_idle()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if self.peer is None:
            # Refused handshakes (bad, expired, revoked certificates) end here: say why.
            self.log.info("connection.handshake_failed peer={addr} reason={reason}",
                          addr=str(self.transport.getPeer()), reason=reason.getErrorMessage())
        self.connected_and_open = False
        self._cancel_timer()
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        pending, self._in_flight = self._in_flight, {}
        for d in pending.values():
            d.cancel()
        for producer in list(self._producers):
            producer.stopProducing()
        self._producers.clear()
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
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, why: str) -> None:
        for timer in (self._timer, self._frame_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = None
        self._frame_timer = None
        self.log.info("connection.timeout reason={reason} identity={identity}",
                      reason=why, identity=self.peer.name if self.peer else None)
        self.transport.abortConnection()

    def buffer_changed(self, pending: int, progressed: bool) -> None:
        if progressed:  # once per read, however many requests it held
            self._arm_idle()
        if progressed and self._frame_timer is not None:
            if self._frame_timer.active():
                self._frame_timer.cancel()
            self._frame_timer = None
        if pending and self._frame_timer is None:
            self._frame_timer = self.server.reactor.callLater(
                self.limits.frame_timeout, self._timed_out, "partial frame")
        elif not pending and self._frame_timer is not None:
            if self._frame_timer.active():
                self._frame_timer.cancel()
            self._frame_timer = None

    # -- frames ---------------------------------------------------------------------

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.info("request.too_large length={length} limit={limit}",
                      length=length, limit=self.MAX_LENGTH)
        self._send_error(None, FrameTooLarge(
            f"frame of {length} bytes is over the {self.MAX_LENGTH}-byte limit"))
        self._close()

    def stringReceived(self, string: bytes | bytearray) -> None:
        if self.peer is None or self.who is None:  # pre-handshake data never reaches us
            self.transport.abortConnection()
            return
        value = None
        try:
            value = codec.decode(string, self.MAX_LENGTH)
            request = codec.parse_request(value)
            if request.id in self._in_flight:
                raise BadRequest(f"request id {request.id} is already in flight")
            if not self._hello:
                if request.method != "hello":
                    raise UnsupportedVersion(
                        f"send hello with protocol version {PROTOCOL_VERSION} first")
            elif len(self._in_flight) >= self.limits.max_in_flight:
                raise Unavailable(f"more than {self.limits.max_in_flight} requests in flight")
        except JobWorkerError as e:
            self._send_error(codec.request_id_of(value), e)
            self._arm_idle()
            return
        except Exception:
            self.log.failure("request.decode_bug")
            self._send_error(codec.request_id_of(value), JobWorkerError("internal error"))
            return
        # The policy may be reloaded (SIGHUP) while we are connected: a new policy object
        # means the caller's role is worked out again before this request is authorized.
        authz = self.server.authz
        if authz.policy is not self._policy:
            self._policy = authz.policy
            self.who = authz.principal(self.peer)
        call = Call(self, request.id, request.method, self.who)
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
        if isinstance(result, Failure):
            if result.check(CancelledError) or not self.connected_and_open:
                return None
            error = result.value
            if not isinstance(error, JobWorkerError):
                self.log.failure("request.bug method={method}", result, method=call.method)
                error = JobWorkerError("internal error")
            self._send_error(call.id, error)
            if isinstance(error, UnsupportedVersion):
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
                self._send_error(call.id, e)
        if later:
            self._arm_idle()
        return None

    def _close(self) -> None:
        """Close after what was written is flushed.  TLS will not shut down while a
        producer is registered, so we step down as the transport's producer first."""
        if self._closing:
            return
        self._closing = True
        for producer in list(self._producers):
            producer.stopProducing()
        self._producers.clear()
        self.flush()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _send_error(self, rid: int | None, error: JobWorkerError) -> None:
        if self.connected_and_open:
            self.send_frame({"id": rid, "error": error.to_wire()})

    # -- IPushProducer, fanned out to streams in flight ------------------------------------

    def add_producer(self, producer: Any) -> None:
        self._producers[producer] = None
        if self.paused:
            producer.pauseProducing()

    def remove_producer(self, producer: Any) -> None:
        self._producers.pop(producer, None)

    def pauseProducing(self) -> None:
        self.paused = True
        for producer in list(self._producers):
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        """Resume streams one after another until the transport is full again.

        The TLS transport reports a pause only once, so a stream resumed after the
        transport filled up would read its whole file into the buffer; stop at the first
        pause instead, and start the next resume one stream further on so none starves.
        """
        self.paused = False
        producers = list(self._producers)
        if not producers:
            return
        start = self._resume_from % len(producers)
        self._resume_from = start + 1
        for producer in producers[start:] + producers[:start]:
            if self.paused:
                break
            producer.resumeProducing()

    def stopProducing(self) -> None:
        for producer in list(self._producers):
            producer.stopProducing()


#: A handler returns its result, or a coroutine when it has to wait (stop, wait, logs).
Handler = Callable[[Call, dict[str, Any]], Any]


class RPCServer(Factory):
    """Holds what the methods need and the dispatch table: one handler per method."""

    log = Logger()
    noisy = False

    def __init__(self, reactor: Any, jobs: JobManager, authz: Authorizer,
                 audit: AuditLog | None = None, limits: Limits = Limits(),
                 follower: Any = None) -> None:
        self.reactor = reactor
        self.jobs = jobs
        self.authz = authz
        self.audit = audit
        self.limits = limits
        self.follower = follower
        self.connections: set[RPCServerProtocol] = set()
        self.accepting = True
        from jobworker import methods  # the handlers, kept apart from the plumbing

        self.methods: dict[str, tuple[Schema, Handler]] = methods.table(self)

    def buildProtocol(self, addr: Any) -> RPCServerProtocol | None:
        proto = RPCServerProtocol(self, self.limits)
        proto.factory = self
        self.connections.add(proto)
        return proto

    def connection_closed(self, proto: RPCServerProtocol) -> None:
        self.connections.discard(proto)

    def dispatch(self, call: Call, params: dict[str, Any]) -> Any:
        """Validate, authorize and run one request: its result, or a coroutine to await
        for methods that wait."""
        entry = self.methods.get(call.method)
        if entry is None:
            raise UnknownMethod(f"unknown method {call.method!r}")
        method_schema, handler = entry
        checked = method_schema.validate(params)
        try:
            self.authz.check_method(call.who, call.method)
        except Forbidden as e:
            self.audit_refusal(call, e, checked)
            raise
        return handler(call, checked)

    def audit_refusal(self, call: Call, error: JobWorkerError, params: dict[str, Any]) -> None:
        if self.audit is not None:
            job = params.get("job")
            self.audit.record(identity=call.who.name, role=call.who.role, method=call.method,
                              job_id=str(job) if job is not None else None,
                              outcome=f"refused:{error.code}", reason=error.message)

    def visible_job(self, call: Call, ref: str | int) -> Job:
        """The job ``ref`` names, if the caller may act on it; else the same NotFound."""
        try:
            job = self.jobs.find(ref)
        except NotFound:
            raise NotFound(f"no job {ref}") from None
        if self.authz.can_see(call.who, job.owner):  # dispatch has checked the method
            return job
        try:
            self.authz.check_job(call.who, call.method, job.owner, ref)
        except (NotFound, Forbidden) as e:
            if call.method == "stop":
                self.audit_refusal(call, e, {"job": ref})
            raise
        return job


class ConnectionCap(policies.WrappingFactory):
    """Refuses connections beyond a cap before any TLS work is spent on them."""

    log = Logger()
    noisy = False

    def __init__(self, wrapped: Any, cap: int) -> None:
        super().__init__(wrapped)
        self.cap = cap

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.cap:
            self.log.warn("connection.refused reason=cap cap={cap} peer={addr}",
                          cap=self.cap, addr=str(addr))
            return None
        return super().buildProtocol(addr)
