"""``twistd jobworker``: command-line options and the service tree.

This and ``jobworker.client.cli`` are the only places that pick the real reactor, files
and ports.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import FileLogObserver
from twisted.python import usage

from jobworker import __version__
from jobworker.daemon.audit import AuditLog
from jobworker.daemon.authz import Authorizer, Policy, PolicyError
from jobworker.daemon.limits import DEFAULTS, Limits
from jobworker.daemon.listener import ConnectionCap, Listener
from jobworker.daemon.logformat import ServiceTree, json_observer, twistd_destination
from jobworker.daemon.metrics import Metrics
from jobworker.daemon.reload import ReloadOnHangup
from jobworker.daemon.runas import DynamicUids, RunAs, parse_range
from jobworker.daemon.sdnotify import Notifier, Readiness
from jobworker.daemon.server import RPCServer
from jobworker.daemon.startup import fail
from jobworker.daemon.statelock import StateLock, StateLocked, StateLockService
from jobworker.daemon.watcher import FileWatcher
from jobworker.jobs.cgpool import CgroupPool
from jobworker.jobs.cgroups import detect
from jobworker.jobs.credentials import can_switch
from jobworker.jobs.durable import DurableStore
from jobworker.jobs.joblimits import JobLimits, LimitPolicy
from jobworker.jobs.logcap import LogCap
from jobworker.jobs.logpool import LogDirPool
from jobworker.jobs.logs import LogStore
from jobworker.jobs.manager import JobManager
from jobworker.jobs.reaping import QuietChildSignals
from jobworker.jobs.reserve import DiskReserve, MinFree
from jobworker.jobs.retention import Retention
from jobworker.jobs.sql import TableError
from jobworker.jobs.store import JobStore, MemoryStore
from jobworker.rpc.tls import ServerTLS, TLSConfigError
from jobworker.rpc.transport import ServerTLSFactory
from jobworker.wire.params import SCHEMAS
from jobworker.wire.sizes import parse_duration, parse_size


def check_listen(description: str) -> None:
    """Refuse, with the reason, a ``--listen`` that no client could use or whose port is
    not a port (Twisted's own message is Python's ``invalid literal for int()``)."""
    kind = description.split(":", 1)[0]
    if kind == "ssl":
        raise usage.UsageError(f"--listen {description}: takes a plain endpoint (tcp:, "
                               "tcp6:); jobworker adds TLS itself")
    if kind == "unix":
        raise usage.UsageError(f"--listen {description}: jwclient reaches the daemon over "
                               "TCP only (--server HOST:PORT), so no client could connect "
                               "to a unix socket; use tcp:PORT or tcp6:PORT")
    if kind in ("tcp", "tcp6"):
        # Fields are split on colons a backslash does not escape (tcp6's interface=\:\:1).
        fields = re.split(r"(?<!\\):", description)[1:]
        named = dict(f.split("=", 1) for f in fields if "=" in f)
        positional = [f for f in fields if "=" not in f]
        port = named.get("port", positional[0] if positional else None)
        if port is None:
            raise usage.UsageError(f"--listen {description}: no port (e.g. {kind}:8443)")
        if not (port.isascii() and port.isdigit() and int(port) <= 65535):
            raise usage.UsageError(f"--listen {description}: the port must be a number "
                                   f"from 0 to 65535, not {port!r}")


def _named_numbers(rows: Sequence[Any]) -> list[Any]:
    """Option rows whose int or float coercer names its option when the value does not
    parse (twistd's own message does not)."""
    return [[*row[:4], _number(row[0], row[4])] if len(row) > 4 else row for row in rows]


def _number(name: str, kind: Callable[[str], Any] | None) -> Callable[[str], Any] | None:
    """``kind`` (int or float) as an option's coercer whose error names the option."""
    if kind not in (int, float):
        return kind
    what = "a whole number" if kind is int else "a number"

    def coerce(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            # A UsageError, not a ValueError: twistd would wrap a ValueError in
            # "Parameter type enforcement failed: ..." without the option's name.
            raise usage.UsageError(f"--{name} must be {what}, not {text!r}") from None

    return coerce


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
        ["max-frame", None, DEFAULTS.max_frame, "Largest request frame in bytes.", int],
        ["max-connections", None, DEFAULTS.max_connections,
         "Most concurrent authenticated client connections.", int],
        ["max-handshakes", None, DEFAULTS.max_handshakes,
         "Most connections in their TLS handshake at once (a pool apart from "
         "--max-connections).", int],
        ["max-streams-per-connection", None, DEFAULTS.max_streams_per_connection,
         "Most log streams open on one connection.", int],
        ["max-streams-per-identity", None, DEFAULTS.max_streams_per_identity,
         "Most log streams open for one identity over all its connections.", int],
        ["handshake-timeout", None, DEFAULTS.handshake_timeout,
         "Seconds allowed for the TLS handshake.", float],
        ["idle-timeout", None, DEFAULTS.idle_timeout,
         "Seconds a connection may stay idle (no request in flight, no complete frame).",
         float],
        ["frame-timeout", None, DEFAULTS.frame_timeout,
         "Seconds allowed to finish a frame once its first byte arrived.", float],
        ["grace", None, 5.0, "Default seconds between SIGTERM and SIGKILL on stop.", float],
        ["min-free", None, "64M",
         "Free space to keep on the state file system (512M, 1G, 5%): below it new jobs "
         "are refused, so stops and job ends are still recorded."],
        ["policy", None, None, "TOML file mapping identities to roles or denying them."],
        ["retention", None, None,
         "Remove ended jobs (record and logs) this long after they ended (30d, 12h)."],
        ["max-history", None, None, "Keep at most this many ended jobs.", int],
        ["max-running", None, None,
         "Run at most N jobs at once; later starts wait, queued, for a slot (default: no "
         "limit).  The policy's [queue.NAME] tables limit each queue too.", int],
        ["max-log-bytes", None, None,
         "Stop a job whose stdout and stderr together pass this size (1G, 512M)."],
        ["dynamic-uids", None, "61184-65519",
         "Range of uids given to identities with no [run_as] user (root daemons only)."],
        ["store", None, "sqlite",
         "Where the job table lives: sqlite (<state-dir>/jobs.db, kept across restarts) "
         "or memory (this daemon's lifetime only)."],
        ["default-memory", None, None, "Memory limit of a job that asks for none (512M, 1G)."],
        ["max-memory", None, None, "Most memory a job may ask for; a start asking for more "
                                   "is refused."],
        ["default-cpu", None, None, "CPU limit, in cores, of a job that asks for none (0.5).",
         float],
        ["max-cpu", None, None, "Most CPU, in cores, a job may ask for.", float],
        ["default-pids", None, None, "Process limit of a job that asks for none.", int],
        ["max-pids", None, None, "Most processes a job may ask for.", int],
        ["metrics", None, None,
         "Twisted endpoint to serve Prometheus metrics on, over plain HTTP at /metrics "
         "(tcp:9464:interface=127.0.0.1); off by default.  See docs/metrics.md."],
        ["log-format", None, "text",
         "text (twistd's) or json: each line of the daemon's log one JSON object, with "
         "time, level, event and the event's fields."],
        ["default-io-read", None, None,
         "Read limit, bytes per second, of a job that asks for none (10M): on the disks of "
         "its working directory and of the state directory."],
        ["max-io-read", None, None, "Most bytes per second of reads a job may ask for."],
        ["default-io-write", None, None,
         "Write limit, bytes per second, of a job that asks for none (10M; on cgroup v1 "
         "direct writes only: buffered writeback is not throttled)."],
        ["max-io-write", None, None, "Most bytes per second of writes a job may ask for."],
        ["cgroup-root-name", None, None,
         "Name of the subtree, beneath the daemon's own cgroup in each hierarchy, that "
         "holds the job cgroups (<own>/<name>/<job id>); one per daemon.  Default: "
         "jobworker-<8 hex digits of the state directory's path>, so a daemon restarted on "
         "the same state finds its jobs' cgroups and daemons on other states never meet."],
    ]
    optFlags = [
        ["fsync", None, "Commit each change of the job table to disk before replying "
                        "(survives power loss; slower)."],
        ["no-cgroups", None, "Run jobs without cgroups (stop then signals the process "
                             "group only, and no usage is counted)."],
    ]

    optParameters = _named_numbers(optParameters)

    def __init__(self) -> None:
        super().__init__()
        self["crl"] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Under twistd (which sets ``parent``), a bad option is one line and exit status
        1: twistd itself would print the whole usage text above it.  Parsed alone (as the
        tests do), a ``UsageError`` as usual."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            fail(str(e))

    def opt_version(self) -> NoReturn:
        """Print jobworker's version and exit."""
        print(f"jobworker {__version__}")
        sys.exit(0)

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
        for name in ("max-connections", "max-handshakes", "max-streams-per-connection",
                     "max-streams-per-identity"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        for name in ("handshake-timeout", "idle-timeout", "frame-timeout", "grace"):
            if not 0 < self[name] <= 86400:
                raise usage.UsageError(f"--{name} must be between 0 and 86400 seconds")
        try:
            self["min-free"] = MinFree.parse(self["min-free"])
        except ValueError as e:
            raise usage.UsageError(f"--min-free: {e}") from None
        if self["retention"] is not None:
            self["retention"] = _seconds("--retention", self["retention"])
        if self["max-history"] is not None and self["max-history"] < 0:
            raise usage.UsageError("--max-history must be 0 or more")
        if self["max-running"] is not None and not 1 <= self["max-running"] <= 2**31:
            raise usage.UsageError("--max-running must be at least 1")
        if self["max-log-bytes"] is not None:
            try:
                self["max-log-bytes"] = parse_size(self["max-log-bytes"])
            except ValueError as e:
                raise usage.UsageError(f"--max-log-bytes: {e}") from None
        try:
            self["dynamic-uids"] = parse_range(self["dynamic-uids"])
        except ValueError as e:
            raise usage.UsageError(f"--dynamic-uids: {e}") from None
        if self["store"] not in ("sqlite", "memory"):
            raise usage.UsageError("--store is sqlite or memory")
        for which in ("default", "max"):
            for key in (f"{which}-memory", f"{which}-io-read", f"{which}-io-write"):
                if self[key] is not None:
                    try:
                        self[key] = parse_size(self[key])
                    except ValueError as e:
                        raise usage.UsageError(f"--{key}: {e}") from None
            if self[f"{which}-cpu"] is not None and not 0.01 <= self[f"{which}-cpu"] <= 4096:
                raise usage.UsageError(f"--{which}-cpu must be from 0.01 to 4096 cores")
            if self[f"{which}-pids"] is not None and self[f"{which}-pids"] < 2:
                raise usage.UsageError(f"--{which}-pids must be at least 2")
        try:
            self["limits"] = LimitPolicy(
                JobLimits(self["default-memory"], self["default-cpu"], self["default-pids"],
                          self["default-io-read"], self["default-io-write"]),
                JobLimits(self["max-memory"], self["max-cpu"], self["max-pids"],
                          self["max-io-read"], self["max-io-write"]))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["limits"].defaults or self["limits"].maxima:
            if self["no-cgroups"]:
                raise usage.UsageError("job limits need cgroups: drop --no-cgroups")
        if self["cgroup-root-name"] is None:
            self["cgroup-root-name"] = default_cgroup_root_name(self["state-dir"])
        name = self["cgroup-root-name"]
        if (not name or name in (".", "..") or "/" in name or "\0" in name
                or len(name) > 200):
            raise usage.UsageError("--cgroup-root-name must be one plain directory name")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format is text or json")
        check_listen(self["listen"])


def _seconds(option: str, text: str) -> float:
    """``30d``, ``12h``, ``5m``, ``90s``, ``250ms`` or plain seconds."""
    try:
        value = parse_duration(text)
    except ValueError:
        raise usage.UsageError(f"{option}: bad duration {text!r} (e.g. 30d, 12h)") from None
    if not 0 < value < 10**10:
        raise usage.UsageError(f"{option}: {text!r} is out of range")
    return value


class _JobManager(JobManager):
    """The job manager, whose table failing to open at start-up (after twistd's fork and
    privilege drop) stops the daemon with one line, like every other start-up error."""

    def startService(self) -> None:
        try:
            super().startService()
        except TableError as e:
            fail(f"--state-dir: cannot use the job table: {e}")


def _target_user(config: Options) -> tuple[int, int] | None:
    """The uid and gid twistd will switch to after ``makeService`` (``-u``/``-g``), if
    it will leave root."""
    parent = getattr(config, "parent", None)
    uid = parent.get("uid") if parent is not None else None
    if uid is None or os.geteuid() != 0 or uid == 0:
        return None
    gid = parent.get("gid") if parent is not None else None
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


def _hand_over(state_dir: str, owner: tuple[int, int]) -> None:
    """Give the state directory and what the daemon writes in it to the user twistd will
    run as, while still root (so ``twistd -u nobody jobworker`` can run jobs)."""
    uid, gid = owner
    paths = [state_dir, os.path.join(state_dir, "logs")]
    paths += [os.path.join(state_dir, name) for name in os.listdir(state_dir)]
    for path in dict.fromkeys(paths):
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except FileNotFoundError:
            pass


def _dynamic_uids(config: Options, state_dir: str) -> DynamicUids | None:
    """The dynamic uid table, for a daemon that stays root; None (jobs run as the
    daemon's user) otherwise."""
    if os.geteuid() != 0 or _target_user(config) is not None or not can_switch():
        return None
    first, last = config["dynamic-uids"]
    dynamic = DynamicUids(os.path.join(state_dir, "dynamic-uids.json"), first, last)
    try:
        dynamic.load()
    except (OSError, ValueError) as e:
        fail(f"--state-dir: cannot read the dynamic uid table: {e}")
    return dynamic


def _tls_option(config: Options, message: str) -> str:
    """The option that named the file a TLS error is about."""
    for name in ("key", "cert", "ca"):  # the key first: a mismatch names key and cert
        if config[name] in message:
            return f"--{name}"
    return "--crl"


def default_cgroup_root_name(state_dir: str) -> str:
    """``jobworker-`` and 8 hex digits of the state directory's absolute path."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(state_dir))).hexdigest()
    return f"jobworker-{digest[:8]}"


def makeService(config: Options) -> service.MultiService:
    from twisted.internet import reactor  # the one twistd installed

    try:
        tls = ServerTLS(config["ca"], config["cert"], config["key"], config["crl"])
    except TLSConfigError as e:
        fail(f"{_tls_option(config, str(e))}: {e}")
    tls.check_crl_dates()
    try:
        policy = Policy.load(config["policy"]) if config["policy"] else Policy()
    except PolicyError as e:
        fail(f"--policy: {e}")
    state_dir = os.path.abspath(config["state-dir"])
    lock = StateLock(state_dir)
    try:
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        lock.acquire()  # before anything in it is touched
    except StateLocked as e:
        fail(f"--state-dir: {e}")
    except OSError as e:
        fail(f"--state-dir: cannot use state directory {state_dir}: {e.strerror}")
    store: JobStore = MemoryStore()
    if config["store"] == "sqlite":
        durable = DurableStore(reactor, os.path.join(state_dir, "jobs.db"),
                               fsync=config["fsync"])
        try:
            durable.check()
        except TableError as e:
            fail(f"--state-dir: cannot use the job table: {e}")
        store = durable
    try:
        audit = AuditLog(os.path.join(state_dir, "audit.log"), reactor.seconds)
        logs = LogStore(os.path.join(state_dir, "logs"))
    except OSError as e:
        fail(f"--state-dir: cannot use state directory {state_dir}: {e.strerror}")
    owner = _target_user(config)
    if owner is not None:
        try:
            _hand_over(state_dir, owner)
        except OSError as e:
            fail(f"--state-dir: cannot hand {state_dir} to uid {owner[0]}: {e.strerror}")
    try:
        endpoint = endpoints.serverFromString(reactor, config["listen"])
    except IndexError:  # systemd:...:index=N beyond the sockets systemd passed
        fail(f"--listen {config['listen']}: no such socket passed by systemd")
    except (ValueError, TypeError, KeyError) as e:
        fail(f"--listen {config['listen']}: {e}")

    metrics = Metrics()  # counts nothing
    scrape: Listener | None = None
    if config["metrics"] is not None:
        try:
            metrics_endpoint = endpoints.serverFromString(reactor, config["metrics"])
        except (ValueError, TypeError, KeyError) as e:
            fail(f"--metrics {config['metrics']}: {e}")
        # Imported only here: a daemon without --metrics never loads prometheus_client.
        from prometheus_client import disable_created_metrics

        from jobworker.daemon.prometheus import PrometheusMetrics
        from jobworker.daemon.scrape import metrics_site

        # Process-wide, and this is the daemon's process: no *_created series (a
        # timestamp per counter that doubles the scrape and that nobody graphs).
        disable_created_metrics()
        prometheus = PrometheusMetrics(SCHEMAS, reactor.seconds)
        # Read at each scrape (rpc is made below, before any scrape can come).
        prometheus.watch(connections=lambda: rpc.authenticated,
                         handshaking=lambda: rpc.handshaking,
                         audit_failures=lambda: audit.failures,
                         queued=lambda: jobs.queued)
        scrape = Listener(metrics_endpoint, metrics_site(prometheus.registry),
                          config["metrics"], option="--metrics", event="metrics.listening")
        scrape.listen()  # here, before twistd daemonizes, as --listen's port
        metrics = prometheus

    limits = Limits(max_frame=config["max-frame"], max_connections=config["max-connections"],
                    handshake_timeout=config["handshake-timeout"],
                    idle_timeout=config["idle-timeout"],
                    frame_timeout=config["frame-timeout"],
                    max_handshakes=config["max-handshakes"],
                    max_streams_per_connection=config["max-streams-per-connection"],
                    max_streams_per_identity=config["max-streams-per-identity"])
    authz = Authorizer(policy)
    spare_logs = LogDirPool(reactor, logs)
    reserve = DiskReserve(state_dir, config["min-free"], reactor.seconds)
    if config["no-cgroups"]:
        cgroups = CgroupPool(reactor, None, "--no-cgroups")
    else:
        # Here, on the thread that will run the reactor and spawn: its cgroups are the
        # ones jobs are made beneath and that it returns to after each spawn.
        found = detect(config["cgroup-root-name"])
        cgroups = CgroupPool(reactor, found.driver, found.reason)
    jobs = _JobManager(reactor, logs, grace=config["grace"], spare_logs=spare_logs,
                       reserve=reserve, store=store, cgroups=cgroups,
                       limits=config["limits"], observer=metrics,
                       max_running=config["max-running"],
                       queue_policy=lambda: authz.policy.queues)
    runas = RunAs(lambda: authz.policy, _dynamic_uids(config, state_dir))
    rpc = RPCServer(reactor, jobs, authz, audit, limits, follower=FileWatcher(reactor),
                    runas=runas, metrics=metrics)
    factory = ConnectionCap(ServerTLSFactory(tls, False, rpc), rpc.full, metrics)

    top = ServiceTree(_log_observer(config))
    StateLockService(lock).setServiceParent(top)
    # Spare log directories and cgroups first, jobs second, listener third: on shutdown
    # the listener stops accepting before running jobs are stopped, and the spares (and
    # the job cgroups) go once no job can start or run (MultiService stops children in
    # reverse order).
    spare_logs.setServiceParent(top)
    cgroups.setServiceParent(top)
    QuietChildSignals(reactor).setServiceParent(top)
    jobs.setServiceParent(top)
    Retention(reactor, store, logs.root, retention=config["retention"],
              max_history=config["max-history"],
              spared=jobs.being_read).setServiceParent(top)
    if config["max-log-bytes"] is not None:
        LogCap(reactor, lambda: jobs.jobs(running_only=True), jobs.stop,
               config["max-log-bytes"]).setServiceParent(top)
    listener = Listener(endpoint, factory, config["listen"])
    listener.listen()  # here, before twistd daemonizes: a port in use is one line
    listener.setServiceParent(top)
    if scrape is not None:
        scrape.setServiceParent(top)
    ReloadOnHangup(reactor, tls, authz, config["policy"], audit, rpc,
                   reloaded=jobs.scheduler.reloaded).setServiceParent(top)
    # Last: started last (READY=1 once all else runs), stopped first (STOPPING=1 at once).
    Readiness(reactor, Notifier.from_environ(os.environ),
              f"listening on {listener.address}").setServiceParent(top)
    return top


def _log_observer(config: Options) -> FileLogObserver | None:
    """The log observer --log-format asks for, or None for twistd's own (text)."""
    if config["log-format"] != "json":
        return None
    out = twistd_destination(getattr(config, "parent", None))
    if out is None:
        fail("--log-format json cannot go to --syslog (syslog has a format of its own)")
    return json_observer(out)
