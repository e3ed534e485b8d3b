"""The daemon's RPC server: builds a protocol per connection and dispatches each request
to its method's handler through the one table of schemas and handlers."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from types import CoroutineType
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from jobworker.daemon.access import JobAccess
from jobworker.daemon.audit import AuditLog
from jobworker.daemon.authz import Authorizer
from jobworker.daemon.call import Call
from jobworker.daemon.connection import RPCServerProtocol
from jobworker.daemon.limits import Limits
from jobworker.daemon.methods import Table, table
from jobworker.daemon.metrics import Metrics
from jobworker.daemon.runas import RunAs
from jobworker.daemon.watcher import FileWatcher
from jobworker.jobs.manager import JobManager
from jobworker.jobs.namespaces import NamespaceSupport
from jobworker.wire.errors import Forbidden, UnknownMethod
from jobworker.wire.identity import PeerIdentity


class RPCServer(Factory):
    """Holds what the methods need and the dispatch table: one handler per method."""

    log = Logger()
    noisy = False

    def __init__(self, reactor: Any, jobs: JobManager, authz: Authorizer,
                 audit: AuditLog | None = None, limits: Limits = Limits(),
                 follower: FileWatcher | None = None, runas: RunAs | None = None,
                 namespaces: NamespaceSupport | None = None,
                 metrics: Metrics | None = None) -> None:
        self.reactor = reactor
        #: What connections, requests and streams are counted by (nothing by default).
        self.metrics = metrics if metrics is not None else Metrics()
        self.jobs = jobs
        self.authz = authz
        self.audit = audit
        self.limits = limits
        self.follower = follower
        self.connections: set[RPCServerProtocol] = set()
        #: Connections in their TLS handshake, and those admitted after it.
        self.handshaking = 0
        self.authenticated = 0
        self.access = JobAccess(jobs, authz, audit)
        # Without one, jobs run as the daemon's own user (tests, a non-root daemon).
        self.runas = runas if runas is not None else RunAs(lambda: authz.policy, None)
        # Namespaces need a daemon that stays root: the one that runs jobs as others.
        self.namespaces = namespaces if namespaces is not None else NamespaceSupport(
            reactor, root=self.runas.dynamic is not None)
        self.methods: Table = table(self.access, limits, follower, self.runas,
                                    self.namespaces, self.metrics)

    def buildProtocol(self, addr: Any) -> RPCServerProtocol | None:
        proto = RPCServerProtocol(self, self.limits)
        proto.factory = self
        self.connections.add(proto)
        self.handshaking += 1
        return proto

    def connection_closed(self, proto: RPCServerProtocol) -> None:
        self.connections.discard(proto)
        if proto.peer is None:
            self.handshaking -= 1
        elif proto.admitted:
            self.authenticated -= 1

    def handshake_done(self, proto: RPCServerProtocol) -> bool:
        """``proto`` has authenticated: whether it may take an authenticated slot."""
        self.handshaking -= 1
        if self.authenticated >= self.limits.max_connections:
            self.metrics.connection_refused("connection_cap")
            return False
        self.authenticated += 1
        return True

    def full(self) -> str | None:
        """Why a new connection would be refused at once, if it would: its handshake
        pool or the authenticated slots are full.  Sockets that never finish a handshake
        fill only their own pool (--max-handshakes), never the authenticated one."""
        if self.handshaking >= self.limits.max_handshakes:
            return f"handshakes={self.handshaking} cap={self.limits.max_handshakes}"
        if self.authenticated >= self.limits.max_connections:
            return f"connections={self.authenticated} cap={self.limits.max_connections}"
        return None

    def recheck(self, revoked: Callable[[PeerIdentity], bool]) -> None:
        """After a reload: end every connection whose identity the policy now denies or
        whose certificate ``revoked`` says is revoked."""
        for proto in list(self.connections):
            peer = proto.peer
            if peer is None:
                continue
            if self.authz.principal(peer).denied:
                proto.revoke(f"identity {peer.name!r} is now denied by policy")
            elif revoked(peer):
                proto.revoke(f"certificate serial {peer.serial} of {peer.name!r} "
                             "has been revoked")

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
            self.access.audit_refusal(call, e, checked)
            raise
        result = handler(call, checked)
        if type(result) is CoroutineType:
            return self._durable(result)
        pending = self.jobs.pending()
        return result if pending is None else _after(pending, result)

    async def _durable(self, outcome: Coroutine[Any, Any, Any]) -> Any:
        """``outcome``'s result, once every change to the job table it made (or saw) is
        committed: a client is never told what a crash could make untrue."""
        result = await outcome
        pending = self.jobs.pending()
        if pending is not None:
            await pending
        return result


async def _after(pending: Deferred[None], result: Any) -> Any:
    await pending
    return result
