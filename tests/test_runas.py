"""Run-as against a real root daemon: no job runs as root by default, each identity gets a
uid of its own, and one identity's job cannot read or signal another's, the daemon, or its
state."""

from __future__ import annotations

import json
import os
import pwd
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PKI, Daemon, daemon_as_nobody, wait_for
from test_robustness import Conn

from jobworker.daemon.runas import DynamicUids
from jobworker.jobs.credentials import Credentials, acting_as, can_switch

pytestmark = pytest.mark.skipif(not can_switch(),
                                reason="run-as needs a root daemon on x86_64 or aarch64")


def run(d: Daemon, *args: str, identity: str = "alice") -> tuple[dict[str, Any], bytes]:
    """Start a job (``--user NAME`` and ``--dir DIR`` as jwclient takes them), wait for
    it, and return its record and stdout: over the wire, not a jwclient process each."""
    params: dict[str, Any] = {}
    args_list = list(args)
    while args_list and args_list[0] in ("--user", "--dir"):
        params[args_list[0][2:]] = args_list[1]
        args_list = args_list[2:]
    params.update(command=args_list[0], args=args_list[1:])
    conn = Conn(d, identity)
    try:
        conn.hello()
        record = conn.call("start", params)
        final = conn.call("wait", {"job": record["id"]})
    finally:
        conn.close()
    return final, (Path(final["log_dir"]) / "stdout.log").read_bytes()


@pytest.fixture
def root_daemon(test_pki: PKI, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(test_pki, tmp_path / "state", jobs_as_root=False).start()
    yield d
    d.stop()


def test_each_identity_runs_as_a_uid_of_its_own(root_daemon: Daemon) -> None:
    d = root_daemon
    alice, out = run(d, "sh", "-c", 'id -u; id -g; echo "$USER $LOGNAME $HOME"')
    uid, gid, env = out.decode().splitlines()
    assert 61184 <= int(uid) <= 65519 and uid == gid
    assert (alice["uid"], alice["gid"]) == (int(uid), int(gid))
    assert env == "jw-alice jw-alice /"
    bob, out = run(d, "id", "-u", identity="bob")
    assert int(out) != int(uid) and bob["uid"] == int(out)
    # Stable across a restart: the table is in the state directory.
    d.stop()
    d.start()
    again, out = run(d, "id", "-u")
    assert int(out) == int(uid)
    table = json.loads((d.state_dir / "dynamic-uids.json").read_text())
    assert table == {"alice": int(uid), "bob": bob["uid"]}


def test_a_job_cannot_read_or_signal_another_identitys_job_or_the_daemon(
        root_daemon: Daemon) -> None:
    d = root_daemon
    bobs = json.loads(d.jwclient("--json", "start", "sh", "-c", "echo secret; sleep 300",
                                 identity="bob", check=True).stdout)
    try:
        wait_for(lambda: (Path(bobs["log_dir"]) / "stdout.log").stat().st_size > 0,
                 what="bob's output")
        state = d.state_dir
        script = "; ".join([
            f"cat {bobs['log_dir']}/stdout.log >/dev/null 2>&1; echo log=$?",
            f"kill -0 {bobs['pid']} 2>/dev/null; echo bob=$?",
            f"kill -0 {d.pid} 2>/dev/null; echo daemon=$?",
            f"cat {state}/audit.log >/dev/null 2>&1; echo audit=$?",
            f"ls {state} >/dev/null 2>&1; echo state=$?",
            f"cat {d.pki.dir}/ca.key >/dev/null 2>&1; echo cakey=$?",
        ])
        final, out = run(d, "sh", "-c", script)
        results = dict(line.split("=") for line in out.decode().split())
        assert results.pop("cakey") in ("0", "1")  # the operator's part: see docs
        assert results == {"log": "1", "bob": "1", "daemon": "1", "audit": "1",
                           "state": "2"}, out
        assert final["state"] == "exited"
        # bob's job is untouched, and the daemon too.
        assert json.loads(d.jwclient("--json", "status", bobs["id"], identity="bob",
                                     check=True).stdout)["state"] == "running"
    finally:
        d.jwclient("stop", "--grace", "1", bobs["id"], identity="bob")


def test_the_policy_maps_identities_to_users_and_root_only_explicitly(
        test_pki: PKI, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[run_as]\nalice = "nobody"\nadmin = "root"\n'
                      '[allowed_users]\nbob = ["daemon"]\n')
    d = Daemon(test_pki, tmp_path / "state", "--policy", str(policy)).start()
    try:
        _, out = run(d, "id", "-u")
        assert int(out) == pwd.getpwnam("nobody").pw_uid
        _, out = run(d, "--user", "daemon", "id", "-u", identity="bob")
        assert int(out) == pwd.getpwnam("daemon").pw_uid
        for identity in ("bob", "alice"):
            refused = d.jwclient("start", "--user", "root", "true", identity=identity)
            assert refused.returncode != 0 and b"may not run jobs as 'root'" in refused.stderr
        _, out = run(d, "id", "-u", identity="admin")
        assert int(out) == 0  # only because the policy says so
        unknown = d.jwclient("start", "--user", "no-such-user-x", "true", identity="bob")
        assert unknown.returncode != 0
    finally:
        d.stop()


def test_twistd_dropping_to_nobody_runs_jobs_as_nobody(test_pki: PKI, tmp_path: Path) -> None:
    """``twistd -u nobody``: the state directory is handed over before the drop."""
    with daemon_as_nobody(test_pki, tmp_path, jobs_as_root=False) as (d, nobody):
        final, out = run(d, "--dir", "/", "id", "-u")
        assert int(out) == nobody.pw_uid == final["uid"]
        assert final["state"] == "exited"
        assert d.state_dir.stat().st_uid == nobody.pw_uid


def test_acting_as_changes_only_the_calling_thread() -> None:
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(os.geteuid())

    t = threading.Thread(target=watch)
    t.start()
    try:
        with acting_as(Credentials(61999, 61999, (), "x", "/")):
            inside = (os.geteuid(), os.getegid())
            wait_for(lambda: len(seen) > 100, what="the other thread to look")
    finally:
        stop.set()
        t.join()
    assert inside == (61999, 61999)
    assert set(seen) == {0} and os.getresuid() == (0, 0, 0) and os.getresgid() == (0, 0, 0)


def test_dynamic_uids_skip_taken_ones_and_run_out_clearly(tmp_path: Path) -> None:
    from jobworker.wire.errors import Unavailable

    table = DynamicUids(str(tmp_path / "t.json"), 62000, 62002, taken=lambda u: u == 62000)
    assert [table.uid_of(n) for n in ("a", "b", "a")] == [62001, 62002, 62001]
    with pytest.raises(Unavailable, match="--dynamic-uids"):
        table.uid_of("c")
    again = DynamicUids(str(tmp_path / "t.json"), 62000, 62002)
    again.load()
    assert again.uid_of("b") == 62002
