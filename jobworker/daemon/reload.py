"""SIGHUP: re-read the policy file and the CRLs without a restart."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.logger import Logger

from jobworker.daemon.audit import AuditLog
from jobworker.daemon.authz import Authorizer, Policy, PolicyError
from jobworker.daemon.server import RPCServer
from jobworker.rpc.tls import ServerTLS, TLSConfigError


class ReloadOnHangup(service.Service):
    """SIGHUP re-reads the policy file and the CRLs (a bad file keeps the old one), opens
    the audit log again (log rotation), and ends the connections of identities that are now
    denied or whose certificates are now revoked."""

    log = Logger()

    def __init__(self, reactor: Any, tls: ServerTLS, authz: Authorizer,
                 policy_path: str | None, audit: AuditLog | None = None,
                 server: RPCServer | None = None,
                 reloaded: Callable[[], None] | None = None) -> None:
        self._reactor = reactor
        self._reloaded = reloaded
        self._server = server
        self._audit = audit
        self._tls = tls
        self._authz = authz
        self._policy_path = policy_path
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(
            signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload))

    def stopService(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()

    def reload(self) -> None:
        if self._audit is not None:
            self._audit.reopen()
        if self._policy_path:
            try:
                self._authz.policy = Policy.load(self._policy_path)
                self.log.info("reload.policy path={path}", path=self._policy_path)
                if self._reloaded is not None:
                    self._reloaded()  # e.g. a queue's parallel raised: start what can
            except PolicyError as e:
                self.log.error("reload.policy_failed reason={reason}", reason=str(e))
        try:
            self._tls.reload_crls()
            self.log.info("reload.tls")
        except TLSConfigError as e:
            self.log.error("reload.tls_failed reason={reason}", reason=str(e))
        if self._server is not None:
            tls = self._tls
            self._server.recheck(lambda peer: tls.revoked(peer.serial, peer.issuer))
