"""``twistd jobworker``: command-line options and the service tree.

This and ``cli.py`` are the only places that pick the real reactor, files and ports.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from jobworker import codec
from jobworker.authz import Authorizer, Policy, PolicyError
from jobworker.server import ConnectionCap, Limits, RPCServer
from jobworker.tls import ServerTLS, ServerTLSFactory, TLSConfigError


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the jobworker daemon: a mutual-TLS 1.3 RPC service that starts, "
                "stops and reports on Linux processes for authenticated clients.")

    optParameters = [
        ["listen", "l", "tcp:8443:interface=127.0.0.1",
         "Twisted endpoint description to listen on (TLS is added on top)."],
        ["pki", None, None, "Directory holding ca.pem, server.pem and server.key."],
        ["ca", None, None, "PEM file of the CA(s) that sign client certificates."],
        ["cert", None, None, "PEM file of the server certificate (then any intermediates)."],
        ["key", None, None, "PEM file of the server's private key."],
        ["state-dir", None, "./jobworker-state", "Directory for job logs and the audit log."],
        ["max-frame", None, codec.DEFAULT_MAX_FRAME, "Largest request frame in bytes.", int],
        ["max-connections", None, 1024, "Most concurrent client connections.", int],
        ["handshake-timeout", None, 10.0, "Seconds allowed for the TLS handshake.", float],
        ["idle-timeout", None, 300.0,
         "Seconds a connection may stay idle (no request in flight, no complete frame).",
         float],
        ["frame-timeout", None, 30.0,
         "Seconds allowed to finish a frame once its first byte arrived.", float],
        ["grace", None, 5.0, "Default seconds between SIGTERM and SIGKILL on stop.", float],
        ["policy", None, None, "TOML file mapping identities to roles or denying them."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["crl"] = []

    def opt_crl(self, path: str) -> None:
        """PEM file of CRLs (one per issuing CA); may be given more than once."""
        self["crl"].append(path)

    def postOptions(self) -> None:
        if self["pki"]:
            for name, file in (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key")):
                if not self[name]:
                    self[name] = os.path.join(self["pki"], file)
        missing = [f"--{n}" for n in ("ca", "cert", "key") if not self[n]]
        if missing:
            raise usage.UsageError(f"{', '.join(missing)} required (or --pki DIR)")
        if not 1024 <= self["max-frame"] <= 16 * 1024 * 1024:
            raise usage.UsageError("--max-frame must be from 1024 to 16777216 bytes")
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        for name in ("handshake-timeout", "idle-timeout", "frame-timeout", "grace"):
            if not 0 < self[name] <= 86400:
                raise usage.UsageError(f"--{name} must be between 0 and 86400 seconds")
        if self["listen"].split(":", 1)[0] == "ssl":
            raise usage.UsageError("--listen takes a plain endpoint (tcp:, unix:); "
                                   "jobworker adds TLS itself")


class ReloadOnHangup(service.Service):
    """SIGHUP re-reads the policy file and the CRLs; a bad file keeps the old one."""

    log = Logger()

    def __init__(self, reactor: Any, tls: ServerTLS, authz: Authorizer,
                 policy_path: str | None) -> None:
        self._reactor = reactor
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
        if self._policy_path:
            try:
                self._authz.policy = Policy.load(self._policy_path)
                self.log.info("reload.policy path={path}", path=self._policy_path)
            except PolicyError as e:
                self.log.error("reload.policy_failed reason={reason}", reason=str(e))
        try:
            self._tls.reload_crls()
            self.log.info("reload.tls")
        except TLSConfigError as e:
            self.log.error("reload.tls_failed reason={reason}", reason=str(e))


class Listener(service.Service):
    """Listens on the endpoint and logs where; failing to listen fails startup."""

    log = Logger()

    def __init__(self, endpoint: Any, factory: Any, description: str) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._description = description
        self._port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:  # an endpoint that listens asynchronously
            _fail(f"cannot listen on {self._description}: endpoint did not listen at once")
        if isinstance(outcome[0], Failure):
            _fail(f"cannot listen on {self._description}: {outcome[0].getErrorMessage()}")
        self._port = outcome[0]
        host = self._port.getHost()
        self.log.info("jobworker.listening host={host} port={port}",
                      host=getattr(host, "host", None) or getattr(host, "name", None),
                      port=getattr(host, "port", None))

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None


class StartupFailed(SystemExit, Exception):
    """Exit status 1, the reason already written.  Also an ``Exception``: a daemonizing
    twistd reports only those to its waiting parent, which otherwise waits forever."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _fail(message: str) -> NoReturn:
    """One clear line and a non-zero exit: no usage dump, no traceback."""
    line = f"twistd jobworker: {message}\n"
    sys.stderr.write(line)
    if sys.__stderr__ is not None and sys.stderr is not sys.__stderr__:
        # Once logging has started, sys.stderr goes to the log: tell the operator too.
        sys.__stderr__.write(line)
        sys.__stderr__.flush()
    raise StartupFailed(message)


def makeService(config: Options) -> service.MultiService:
    from twisted.internet import reactor

    from jobworker.audit import AuditLog
    from jobworker.follow import FileWatcher
    from jobworker.jobs import JobManager
    from jobworker.logpool import LogDirPool
    from jobworker.logs import LogStore
    from jobworker.process import QuietChildSignals

    try:
        tls = ServerTLS(config["ca"], config["cert"], config["key"], config["crl"])
    except TLSConfigError as e:
        _fail(str(e))
    try:
        policy = Policy.load(config["policy"]) if config["policy"] else Policy()
    except PolicyError as e:
        _fail(str(e))
    state_dir = os.path.abspath(config["state-dir"])
    try:
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        audit = AuditLog(os.path.join(state_dir, "audit.log"), reactor.seconds)
        logs = LogStore(os.path.join(state_dir, "logs"))
    except OSError as e:
        _fail(f"cannot use state directory {state_dir}: {e.strerror}")
    try:
        endpoint = endpoints.serverFromString(reactor, config["listen"])
    except (ValueError, TypeError, KeyError) as e:
        _fail(f"bad --listen {config['listen']!r}: {e}")

    limits = Limits(max_frame=config["max-frame"], max_connections=config["max-connections"],
                    handshake_timeout=config["handshake-timeout"],
                    idle_timeout=config["idle-timeout"],
                    frame_timeout=config["frame-timeout"])
    authz = Authorizer(policy)
    spare_logs = LogDirPool(reactor, logs)
    jobs = JobManager(reactor, logs, grace=config["grace"], spare_logs=spare_logs)
    rpc = RPCServer(reactor, jobs, authz, audit, limits, follower=FileWatcher(reactor))
    factory = ConnectionCap(ServerTLSFactory(tls, False, rpc), limits.max_connections)

    top = service.MultiService()
    # Spare log directories first, jobs second, listener third: on shutdown the listener
    # stops accepting before running jobs are stopped, and the spares go once no job can
    # start (MultiService stops children in reverse order).
    spare_logs.setServiceParent(top)
    QuietChildSignals(reactor).setServiceParent(top)
    jobs.setServiceParent(top)
    Listener(endpoint, factory, config["listen"]).setServiceParent(top)
    ReloadOnHangup(reactor, tls, authz, config["policy"]).setServiceParent(top)
    return top
