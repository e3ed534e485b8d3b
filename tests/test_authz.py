"""Authorization against a real daemon: roles, ownership, policy, revocation, audit."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import PKI, Daemon, wait_for
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from jobworker import pki
from jobworker.client.api import Client, ClientConfig, ClientError, connect
from jobworker.wire.errors import JobWorkerError

OK = "ok"

# Expected outcome of every role x method x target, written out by hand (not derived
# from jobworker.daemon.authz) so that a change in policy code shows up here.
#   own:     a job the caller started (viewer and norole cannot start one: they get the
#            admin's job, like "other")
#   other:   a job started by another identity
#   pid:     another identity's job named by pid
#   missing: no such job
EXPECTED: dict[str, dict[str, dict[str, str]]] = {
    "admin": {
        "status": {"own": OK, "other": OK, "pid": OK, "missing": "not_found"},
        "logs": {"own": OK, "other": OK, "pid": OK, "missing": "not_found"},
        "wait": {"own": OK, "other": OK, "pid": OK, "missing": "not_found"},
        "stop": {"own": OK, "other": OK, "pid": OK, "missing": "not_found"},
    },
    "alice": {  # role user
        "status": {"own": OK, "other": "not_found", "pid": "not_found", "missing": "not_found"},
        "logs": {"own": OK, "other": "not_found", "pid": "not_found", "missing": "not_found"},
        "wait": {"own": OK, "other": "not_found", "pid": "not_found", "missing": "not_found"},
        "stop": {"own": OK, "other": "not_found", "pid": "not_found", "missing": "not_found"},
    },
    "auditor": {  # role viewer
        "status": {"own": OK, "other": OK, "pid": OK, "missing": "not_found"},
        "logs": {"own": OK, "other": OK, "pid": OK, "missing": "not_found"},
        "wait": {"own": OK, "other": OK, "pid": OK, "missing": "not_found"},
        "stop": {"own": "forbidden", "other": "forbidden", "pid": "forbidden",
                 "missing": "forbidden"},
    },
    "norole": {  # no OU: whoami only
        m: {t: "forbidden" for t in ("own", "other", "pid", "missing")}
        for m in ("status", "logs", "wait", "stop")
    },
    "weird": {  # unknown OU: whoami only
        m: {t: "forbidden" for t in ("own", "other", "pid", "missing")}
        for m in ("status", "logs", "wait", "stop")
    },
}
START = {"admin": OK, "alice": OK, "auditor": "forbidden", "norole": "forbidden",
         "weird": "forbidden"}
# Which owners' jobs each identity sees in `list` (None: list itself is forbidden).
LIST = {"admin": {"admin", "alice", "bob"}, "alice": {"alice"},
        "auditor": {"admin", "alice", "bob"}, "norole": None, "weird": None}
WHOAMI_ROLE = {"admin": "admin", "alice": "user", "auditor": "viewer", "norole": None,
               "weird": None}


async def _outcome(d: Any) -> str:
    try:
        await d
    except JobWorkerError as e:
        return e.code
    return OK


async def _client(daemon: Daemon, identity: str) -> Client:
    return await connect(reactor, daemon.config(identity))


@pytest.fixture(scope="module")
def jobs(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """One ended job each for admin, alice and bob, started through jwclient."""
    out = {}
    for who in ("admin", "alice", "bob"):
        job_id = daemon.jwclient("start", "--", "echo", who, identity=who,
                                 check=True).stdout.decode().strip()
        daemon.jwclient("wait", job_id, identity=who, check=True)
        rec = json.loads(daemon.jwclient("--json", "status", job_id, identity=who,
                                         check=True).stdout)
        out[who] = rec
    return out


@pytest.mark.parametrize("identity", sorted(EXPECTED))
@pytest_twisted.ensureDeferred
async def test_role_method_target_table(daemon: Daemon, jobs: dict[str, Any],
                                        identity: str) -> None:
    """Every job method on own / other / by-pid / missing jobs gives the exact outcome."""
    client = await _client(daemon, identity)
    try:
        own = jobs.get(identity, jobs["admin"])
        other = jobs["bob"]
        targets = {"own": own["id"], "other": other["id"], "pid": other["pid"],
                   "missing": "00000000-0000-4000-8000-000000000000"}
        got: dict[str, dict[str, str]] = {}
        for method in ("status", "logs", "wait", "stop"):
            got[method] = {}
            for target, ref in targets.items():
                got[method][target] = await _outcome(client.call(method, {"job": ref}))
        assert got == EXPECTED[identity]
    finally:
        client.close()


@pytest.mark.parametrize("identity", sorted(START))
@pytest_twisted.ensureDeferred
async def test_start_list_whoami_by_role(daemon: Daemon, jobs: dict[str, Any],
                                         identity: str) -> None:
    """start is for admin and user; list shows only visible jobs; whoami works for all."""
    client = await _client(daemon, identity)
    try:
        me = await client.call("whoami")
        admin = {"audit_failures": 0} if WHOAMI_ROLE[identity] == "admin" else {}
        assert me == {"identity": identity, "role": WHOAMI_ROLE[identity], **admin}
        assert await _outcome(client.call("start", {"command": "true"})) == START[identity]
        if LIST[identity] is None:
            assert await _outcome(client.call("list")) == "forbidden"
        else:
            owners = {r.owner for r in await client.list()}
            assert owners == LIST[identity]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_user_cannot_stop_another_users_running_job(daemon: Daemon) -> None:
    """A user's stop of another user's running job is not_found and leaves it running."""
    bob = await _client(daemon, "bob")
    alice = await _client(daemon, "alice")
    try:
        rec = await bob.start("sleep", ["30"])
        assert await _outcome(alice.call("stop", {"job": rec.id})) == "not_found"
        assert (await bob.record("status", rec.id)).state == "running"
        stopped = await bob.record("stop", rec.id, grace=1.0)
        assert stopped.state == "stopped" and stopped.signal == "SIGTERM"
    finally:
        bob.close()
        alice.close()


def _audit(daemon: Daemon) -> list[dict[str, Any]]:
    path = daemon.state_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_audit_log_records_starts_stops_and_refusals(daemon: Daemon) -> None:
    """start, stop and refused requests each leave one JSON line in audit.log."""
    job_id = daemon.jwclient("start", "--", "sleep", "30", identity="alice",
                             check=True).stdout.decode().strip()
    refused = daemon.jwclient("start", "--", "true", identity="auditor")
    assert refused.returncode != 0 and b"may not call start" in refused.stderr
    daemon.jwclient("stop", "--grace", "1", job_id, identity="alice", check=True)
    hidden = daemon.jwclient("stop", job_id, identity="bob")
    assert hidden.returncode != 0

    entries = _audit(daemon)
    for entry in entries:
        assert set(entry) >= {"time", "identity", "role", "method", "job_id", "outcome"}
    mine = [(e["identity"], e["method"], e["outcome"]) for e in entries
            if e["job_id"] == job_id]
    assert ("alice", "start", "started") in mine
    assert ("alice", "stop", "requested") in mine
    assert ("bob", "stop", "refused:not_found") in mine
    assert any(e["identity"] == "auditor" and e["method"] == "start"
               and e["outcome"] == "refused:forbidden" for e in entries)


def _write_policy(path: Path, text: str) -> None:
    path.write_text(text)


@pytest_twisted.ensureDeferred
async def test_policy_overrides_role_and_denies_and_reloads_on_sighup(
        make_daemon: Any, tmp_path: Path) -> None:
    """--policy maps identities to roles and denies others; SIGHUP reloads it, a bad
    file keeps the old policy and says why in the log."""
    policy = tmp_path / "policy.toml"
    _write_policy(policy, 'deny = ["alice"]\n[roles]\nbob = "viewer"\n')
    d = make_daemon("--policy", str(policy))
    bob = await _client(d, "bob")
    alice = await _client(d, "alice")
    try:
        assert await bob.call("whoami") == {"identity": "bob", "role": "viewer"}
        assert await _outcome(bob.call("start", {"command": "true"})) == "forbidden"
        assert await _outcome(alice.call("whoami")) == "forbidden"

        _write_policy(policy, '[roles]\nbob = "admin"\n')
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reload.policy" in d.log(), what="policy reload")
        assert await bob.call("whoami") == {"identity": "bob", "role": "admin",
                                            "audit_failures": 0}
        assert (await alice.call("whoami"))["role"] == "user"

        _write_policy(policy, "this is not toml [")
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reload.policy_failed" in d.log(), what="failed reload")
        assert await bob.call("whoami") == {"identity": "bob", "role": "admin",
                                            "audit_failures": 0}
    finally:
        bob.close()
        alice.close()
    assert d.tracebacks() == []


class ChainPKI:
    """root CA → intermediate CA → clients; CRLs for both CAs."""

    def __init__(self, base: PKI, root: Path) -> None:
        self.root = root
        self.base = base
        self.ikey, self.icert = pki.make_intermediate_ca(base.ca_key, base.ca_cert,
                                                         "jobworker intermediate")
        self.bundle = root / "ca-bundle.pem"
        pki.write_chain(self.bundle, [base.ca_cert, self.icert])
        self.root_crl = root / "root.crl"
        self.inter_crl = root / "inter.crl"
        pki.write_crl(self.root_crl, pki.make_crl(base.ca_key, base.ca_cert, []))
        self.revoke([], 1)
        self.serials: dict[str, int] = {}

    def client(self, name: str) -> ClientConfig:
        key, cert = pki.make_client_cert(self.ikey, self.icert, name, role="user")
        self.serials[name] = cert.serial_number
        pki.write_key(self.root / f"{name}.key", key)
        pki.write_chain(self.root / f"{name}.pem", [cert, self.icert])
        return ClientConfig("", self.base.ca, str(self.root / f"{name}.pem"),
                            str(self.root / f"{name}.key"))

    def revoke(self, serials: list[int], number: int) -> None:
        pki.write_crl(self.inter_crl, pki.make_crl(self.ikey, self.icert, serials,
                                                   crl_number=number))


@pytest_twisted.ensureDeferred
async def test_revoked_certificate_refused_after_sighup_live_connection_kept(
        make_daemon: Any, test_pki: PKI, tmp_path: Path) -> None:
    """With CRLs for root and intermediate, a revoked client is refused after SIGHUP,
    valid ones still connect, and a live connection is not dropped."""
    chain = ChainPKI(test_pki, tmp_path)
    carol_cfg, dave_cfg = chain.client("carol"), chain.client("dave")
    d = make_daemon("--ca", str(chain.bundle), "--crl", str(chain.root_crl),
                    "--crl", str(chain.inter_crl))

    def at(cfg: ClientConfig) -> ClientConfig:
        return ClientConfig(d.address, cfg.ca, cfg.cert, cfg.key)

    carol = await connect(reactor, at(carol_cfg))
    dave = await connect(reactor, at(dave_cfg))
    assert (await dave.call("whoami"))["identity"] == "dave"
    dave.close()

    chain.revoke([chain.serials["dave"]], 2)
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload.tls" in d.log(), what="TLS reload")

    with pytest.raises(ClientError):
        await connect(reactor, at(dave_cfg))
    assert (await carol.call("whoami"))["identity"] == "carol"  # live connection kept
    carol2 = await connect(reactor, at(carol_cfg))  # a valid cert still gets in
    assert (await carol2.call("whoami"))["identity"] == "carol"
    carol.close()
    carol2.close()
    assert d.tracebacks() == []


@pytest_twisted.ensureDeferred
async def test_crl_check_needs_no_crl_gaps(make_daemon: Any, test_pki: PKI,
                                           tmp_path: Path) -> None:
    """Without a CRL for the intermediate, OpenSSL's CRL check refuses even valid
    certificates: the daemon must be given one CRL per issuing CA (documented)."""
    chain = ChainPKI(test_pki, tmp_path)
    cfg = chain.client("erin")
    d = make_daemon("--ca", str(chain.bundle), "--crl", str(chain.root_crl))
    with pytest.raises(ClientError):
        await connect(reactor, ClientConfig(d.address, cfg.ca, cfg.cert, cfg.key))


@pytest_twisted.ensureDeferred
async def test_revocation_ends_open_streams_and_the_connection(
        make_daemon: Any, test_pki: PKI, tmp_path: Path) -> None:
    """A follow stream opened before its certificate was revoked (then SIGHUP) ends with a
    forbidden error saying so, and its connection is closed; others are untouched."""
    chain = ChainPKI(test_pki, tmp_path)
    carol_cfg, dave_cfg = chain.client("carol"), chain.client("dave")
    d = make_daemon("--ca", str(chain.bundle), "--crl", str(chain.root_crl),
                    "--crl", str(chain.inter_crl))

    def at(cfg: ClientConfig) -> ClientConfig:
        return ClientConfig(d.address, cfg.ca, cfg.cert, cfg.key)

    carol, dave = await connect(reactor, at(carol_cfg)), await connect(reactor, at(dave_cfg))
    job = await carol.start("sleep", ["60"])
    follow = Deferred.fromCoroutine(carol.logs(job.id, lambda _: None, follow=True)).addTimeout(20, reactor)
    assert (await dave.call("whoami"))["identity"] == "dave"
    chain.revoke([chain.serials["carol"]], 2)
    d.signal(signal.SIGHUP)
    with pytest.raises(JobWorkerError) as info:
        await follow
    assert info.value.code == "forbidden" and "revoked" in info.value.message
    assert (await dave.call("whoami"))["identity"] == "dave"  # not revoked: kept
    wait_for(lambda: "connection.revoked" in d.log(), what="the revocation in the log")
    dave.close()
    assert d.tracebacks() == []


@pytest_twisted.ensureDeferred
async def test_a_policy_deny_ends_open_streams(make_daemon: Any, test_pki: PKI,
                                               tmp_path: Path) -> None:
    """An identity denied by a reloaded policy loses its open follow stream at once, with a
    forbidden error saying it is denied."""
    policy = tmp_path / "policy.toml"
    _write_policy(policy, "")
    d = make_daemon("--policy", str(policy))
    alice = await _client(d, "alice")
    job = await alice.start("sleep", ["60"])
    follow = Deferred.fromCoroutine(alice.logs(job.id, lambda _: None, follow=True)).addTimeout(20, reactor)
    await alice.call("whoami")  # the follow is open
    _write_policy(policy, 'deny = ["alice"]\n')
    d.signal(signal.SIGHUP)
    with pytest.raises(JobWorkerError) as info:
        await follow
    assert info.value.code == "forbidden" and "denied" in info.value.message
    admin = await _client(d, "admin")
    await admin.call("stop", {"job": job.id, "grace": 1})
    admin.close()
    assert d.tracebacks() == []


@pytest.mark.parametrize(("days_left", "event"), [(0.5, "tls.crl_expiring"),
                                                   (-1.0, "tls.crl_expired")])
def test_a_crl_near_or_past_its_next_update_is_logged(
        test_pki: PKI, tmp_path: Path, events: list[dict[str, Any]], days_left: float,
        event: str) -> None:
    """At load (start-up and SIGHUP), a CRL that has expired is an error and one that
    expires within a day a warning, each naming its nextUpdate."""
    import datetime

    from twisted.logger import formatEvent

    from jobworker.rpc.tls import ServerTLS

    crl = tmp_path / "ca.crl"
    pki.write_crl(crl, pki.make_crl(test_pki.ca_key, test_pki.ca_cert, [], days=1))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1 - days_left)
    tls = ServerTLS(test_pki.ca, str(test_pki.dir / "server.pem"),
                    str(test_pki.dir / "server.key"), [str(crl)], now=lambda: later)
    tls.check_crl_dates()
    [line] = [formatEvent(e) for e in events if formatEvent(e).startswith("tls.crl_")]
    assert line.startswith(event) and "next_update=" in line
    events.clear()
    pki.write_crl(crl, pki.make_crl(test_pki.ca_key, test_pki.ca_cert, [], days=30))
    tls2 = ServerTLS(test_pki.ca, str(test_pki.dir / "server.pem"),
                     str(test_pki.dir / "server.key"), [str(crl)])
    tls2.check_crl_dates()  # a fresh CRL: nothing to say
    assert not [e for e in events if formatEvent(e).startswith("tls.crl_")]
