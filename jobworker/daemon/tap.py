"""``twistd jobworker``: command-line options and the service tree.

This and ``jobworker.client.cli`` are the only places that pick the real reactor, files
and ports.
"""

from __future__ import annotations

import hashlib
import os
import pwd

from twisted.application import service
from twisted.internet import endpoints
from twisted.python import usage

from jobworker.daemon.audit import AuditLog
from jobworker.daemon.authz import Authorizer, Policy, PolicyError
from jobworker.daemon.limits import DEFAULTS, Limits
from jobworker.daemon.listener import ConnectionCap, Listener
from jobworker.daemon.reload import ReloadOnHangup
from jobworker.daemon.runas import DynamicUids, RunAs, parse_range
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
from jobworker.wire.sizes import parse_duration, parse_size


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
            key = f"{which}-memory"
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
                JobLimits(self["default-memory"], self["default-cpu"], self["default-pids"]),
                JobLimits(self["max-memory"], self["max-cpu"], self["max-pids"]))
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
        if self["listen"].split(":", 1)[0] == "ssl":
            raise usage.UsageError("--listen takes a plain endpoint (tcp:, unix:); "
                                   "jobworker adds TLS itself")


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
            fail(f"cannot use the job table: {e}")


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
        fail(f"cannot read the dynamic uid table: {e}")
    return dynamic
def default_cgroup_root_name(state_dir: str) -> str:
    """``jobworker-`` and 8 hex digits of the state directory's absolute path."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(state_dir))).hexdigest()
    return f"jobworker-{digest[:8]}"


def makeService(config: Options) -> service.MultiService:
    from twisted.internet import reactor  # the one twistd installed

    try:
        tls = ServerTLS(config["ca"], config["cert"], config["key"], config["crl"])
    except TLSConfigError as e:
        fail(str(e))
    tls.check_crl_dates()
    try:
        policy = Policy.load(config["policy"]) if config["policy"] else Policy()
    except PolicyError as e:
        fail(str(e))
    state_dir = os.path.abspath(config["state-dir"])
    lock = StateLock(state_dir)
    try:
        os.makedirs(state_dir, mode=0o750, exist_ok=True)
        lock.acquire()  # before anything in it is touched
    except StateLocked as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot use state directory {state_dir}: {e.strerror}")
    store: JobStore = MemoryStore()
    if config["store"] == "sqlite":
        durable = DurableStore(reactor, os.path.join(state_dir, "jobs.db"),
                               fsync=config["fsync"])
        try:
            durable.check()
        except TableError as e:
            fail(f"cannot use the job table: {e}")
        store = durable
    try:
        audit = AuditLog(os.path.join(state_dir, "audit.log"), reactor.seconds)
        logs = LogStore(os.path.join(state_dir, "logs"))
    except OSError as e:
        fail(f"cannot use state directory {state_dir}: {e.strerror}")
    owner = _target_user(config)
    if owner is not None:
        try:
            _hand_over(state_dir, owner)
        except OSError as e:
            fail(f"cannot hand {state_dir} to uid {owner[0]}: {e.strerror}")
    try:
        endpoint = endpoints.serverFromString(reactor, config["listen"])
    except (ValueError, TypeError, KeyError) as e:
        fail(f"bad --listen {config['listen']!r}: {e}")

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
                       limits=config["limits"], max_running=config["max-running"],
                       queue_policy=lambda: authz.policy.queues)
    runas = RunAs(lambda: authz.policy, _dynamic_uids(config, state_dir))
    rpc = RPCServer(reactor, jobs, authz, audit, limits, follower=FileWatcher(reactor),
                    runas=runas)
    factory = ConnectionCap(ServerTLSFactory(tls, False, rpc), rpc.full)

    top = service.MultiService()
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
    Listener(endpoint, factory, config["listen"]).setServiceParent(top)
    ReloadOnHangup(reactor, tls, authz, config["policy"], audit, rpc,
                   reloaded=jobs.scheduler.reloaded).setServiceParent(top)
    return top
