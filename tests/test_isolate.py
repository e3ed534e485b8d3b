"""Namespaces per job (start's ``isolate``): the helper's command line and the probe without
a daemon, then a real root daemon running jobs in new PID, network and mount namespaces,
stopping them as it stops any job, and refusing isolation where it cannot isolate."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import PKI, Daemon, daemon_as_nobody, wait_for
from test_robustness import Conn

from jobworker.client.cli import build_parser
from jobworker.jobs import nsinit
from jobworker.jobs.credentials import Credentials, can_switch
from jobworker.jobs.namespaces import NamespaceSupport, helper_command, probe_host
from jobworker.wire.codec import encode
from jobworker.wire.errors import BadRequest
from jobworker.wire.params import SCHEMAS, start_digest
from jobworker.wire.record import ISOLATE

SYSTEM_PYTHON = "/usr/bin/python3"  # one every dynamic uid may run (not a 0700 home's)

# -- without a daemon ------------------------------------------------------------------


def test_the_helper_command_carries_the_program_the_user_and_the_environment() -> None:
    """The helper gets the program, the job's ids and its environment under other names."""
    creds = Credentials(61000, 61001, (5, 6), "jw-x", "/")
    env = {"PATH": "/usr/bin:/bin", "LD_PRELOAD": "/tmp/evil.so", "X": "a=b"}
    exe, args, helper_env = helper_command(["pid"], "/bin/sh", ["sh", "-c", "echo hi"], env,
                                           creds, python="/py")
    assert exe == "/py"
    assert args == ["/py", "-I", "-S", nsinit.__file__, "--ns", "pid,mount",
                    "--uid", "61000", "--gid", "61001", "--groups", "5,6",
                    "--", "/bin/sh", "sh", "-c", "echo hi"]
    # The root helper itself sees none of the job's variables: no LD_PRELOAD for it.
    assert set(helper_env) == {"JOBWORKER_NSENV_0", "JOBWORKER_NSENV_1", "JOBWORKER_NSENV_2"}
    plan = nsinit.parse(args[4:])
    assert (plan.namespaces, plan.uid, plan.gid, plan.groups) == (("pid", "mount"), 61000,
                                                                  61001, (5, 6))
    assert (plan.executable, plan.argv) == ("/bin/sh", ["sh", "-c", "echo hi"])
    as_bytes = {os.fsencode(k): os.fsencode(v) for k, v in helper_env.items()}
    back = nsinit.job_environment({**as_bytes, b"LC_CTYPE": b"C.UTF-8"})
    assert back == {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    assert list(back) == [b"PATH", b"LD_PRELOAD", b"X"]


def test_the_helper_command_without_a_user_and_the_canonical_order() -> None:
    """Without credentials (a daemon running jobs as itself) no ids are passed; namespaces
    come in one order whatever the request's."""
    _, args, _ = helper_command(["mount", "net"], "/bin/true", ["true"], {}, None, "/py")
    assert args == ["/py", "-I", "-S", nsinit.__file__, "--ns", "net,mount", "--",
                    "/bin/true", "true"]
    assert nsinit.effective(["net"]) == ("net",)
    assert nsinit.effective(["mount", "pid"]) == ("pid", "mount")
    assert nsinit.NAMESPACES == ISOLATE
    for bad in (["--ns", "pid"], ["--ns", "cgroup", "--", "/x", "x"],
                ["--uid", "1", "--ns", "pid", "--", "/x", "x"], ["--bogus", "1"]):
        with pytest.raises(ValueError):
            nsinit.parse(bad)


def test_the_start_schema_takes_distinct_known_namespaces() -> None:
    """``isolate`` is a list of distinct names of pid, net, mount; anything else is
    bad_request."""
    start = SCHEMAS["start"]
    assert start.validate({"command": "x"})["isolate"] == []
    assert start.validate({"command": "x", "isolate": ["net", "pid"]})["isolate"] == ["net",
                                                                                      "pid"]
    for bad in (["pid", "pid"], ["cgroup"], "pid", [1], ["PID"], {"pid": True}):
        with pytest.raises(BadRequest):
            start.validate({"command": "x", "isolate": bad})


def test_the_retry_digest_covers_isolate_and_keeps_earlier_digests() -> None:
    """A retried start must ask for the same namespaces; without any, the digest is the
    one an earlier daemon computed (retries across an upgrade still match)."""
    start = SCHEMAS["start"]
    plain = start.validate({"command": "x", "args": ["1"]})
    before = hashlib.blake2b(encode(["x", ["1"], [], None, None, None]), digest_size=16)
    assert start_digest(plain) == before.digest()
    a = start_digest(start.validate({"command": "x", "args": ["1"], "isolate": ["pid", "net"]}))
    b = start_digest(start.validate({"command": "x", "args": ["1"], "isolate": ["net", "pid"]}))
    assert a == b != start_digest(plain)


@pytest.mark.parametrize("limit", [{"memory": 64 << 20}, {"cpu": 0.5}, {"pids": 16},
                                   {"io_read": 1 << 20}, {"io_write": 1 << 20}])
def test_the_retry_digest_covers_each_limit(limit: dict[str, Any]) -> None:
    """A retry asking for another limit under the same request_id is a different start
    (refused), not the first job silently; one asking for the same limit matches."""
    start = SCHEMAS["start"]
    plain = start_digest(start.validate({"command": "x"}))
    limited = start_digest(start.validate({"command": "x", **limit}))
    assert limited != plain
    assert limited == start_digest(start.validate({"command": "x", **limit}))
    other = {k: v * 2 for k, v in limit.items()}
    assert start_digest(start.validate({"command": "x", **other})) != limited


def test_jwclient_isolate_option() -> None:
    """``--isolate pid,net`` becomes a list; unknown names are a usage error."""
    args = build_parser().parse_args(["start", "--isolate", "pid,net,pid", "true"])
    assert args.isolate == ["pid", "net"]
    assert build_parser().parse_args(["run", "true"]).isolate is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "--isolate", "pid,cgroup", "true"])


def test_a_daemon_that_is_not_root_refuses_isolation() -> None:
    """No probe is run: the refusal says the daemon is not root."""
    support = NamespaceSupport(None, root=False, probe=lambda: pytest.fail("probed"))
    with pytest.raises(BadRequest, match="not root"):
        support.ready()


@pytest_twisted.ensureDeferred
async def test_the_probe_runs_once_and_its_answer_is_kept() -> None:
    """Callers during the first probe each wait for it; afterwards the answer is at hand."""
    from twisted.internet import reactor

    calls: list[int] = []

    def probe() -> str | None:
        calls.append(1)
        return "unshare(pid,net,mount): Operation not permitted"

    support = NamespaceSupport(reactor, root=True, probe=probe)
    first, second = support.ready(), support.ready()
    assert first is not None and second is not None and first is not second
    for d in (first, second):
        with pytest.raises(BadRequest, match="Operation not permitted"):
            await d
    with pytest.raises(BadRequest, match="cannot isolate jobs: unshare"):
        support.ready()
    assert calls == [1]
    works = NamespaceSupport(reactor, root=True, probe=lambda: None)
    waiting = works.ready()
    assert waiting is not None
    assert await waiting is None
    assert works.ready() is None


# -- against a real root daemon --------------------------------------------------------

@pytest.fixture(scope="module")
def isolating(test_pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A root daemon on a host that can make namespaces (else the tests are skipped)."""
    if not can_switch():
        pytest.skip("isolation needs a root daemon on x86_64 or aarch64")
    why_not = probe_host()
    if why_not is not None:
        pytest.skip(f"this host cannot make namespaces: {why_not}")
    # Jobs as their identity's dynamic uid, as in production (not the suite's root).
    d = Daemon(test_pki, tmp_path_factory.mktemp("isolate") / "state",
               jobs_as_root=False).start()
    yield d
    d.stop()


def start(d: Daemon, *args: str) -> dict[str, Any]:
    return json.loads(d.jwclient("--json", "start", *args, check=True).stdout)  # type: ignore[no-any-return]


def finish(d: Daemon, record: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """Wait for the job; its final record, stdout and stderr (read from its log files:
    the job wrote them itself, so they are whole once it has ended)."""
    final = json.loads(d.jwclient("--json", "wait", record["id"]).stdout)  # exits as the job
    logs = Path(final["log_dir"])
    return final, (logs / "stdout.log").read_text(), (logs / "stderr.log").read_text()


def run(d: Daemon, *args: str) -> tuple[dict[str, Any], str, str]:
    return finish(d, start(d, *args))


def processes_with(token: str) -> list[int]:
    """Pids on the host whose command line holds ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def stdout_says(record: dict[str, Any], text: str) -> bool:
    try:
        return text in (Path(record["log_dir"]) / "stdout.log").read_text()
    except FileNotFoundError:
        return False


def test_a_pid_isolated_job_sees_only_its_own_processes(isolating: Daemon) -> None:
    """Its shell is pid 2 (the helper's init is 1) and /proc lists a handful of pids; it
    runs as its identity's dynamic uid, as without isolation."""
    final, out, err = run(isolating, "--isolate", "pid", "sh", "-c",
                          'echo $$; ls /proc | grep -c "^[0-9]"; id -u')
    assert (final["state"], final["exit_code"]) == ("exited", 0), err
    shell, count, uid = out.split()
    assert shell == "2"
    assert int(count) <= 5  # the init, sh, ls, grep
    assert final["isolate"] == ["pid", "mount"]
    assert 61184 <= int(uid) <= 65519 and int(uid) == final["uid"] == final["gid"]
    host_pids = sum(e.isdigit() for e in os.listdir("/proc"))
    assert host_pids > int(count)


def test_stop_reaches_the_program_through_the_init(isolating: Daemon) -> None:
    """TERM reaches the program: a trap that exits 7 gives exit_code 7 well within the
    grace, and a plain sleep ends by SIGTERM, the same record as without isolation; the
    namespace is gone afterwards."""
    d = isolating
    token = f"jw-ns-{uuid.uuid4().hex[:8]}"
    trapping = start(d, "--isolate", "pid", "sh", "-c",
                     f'trap "exit 7" TERM; echo ready; while :; do sleep 0.1; done # {token}')
    wait_for(lambda: stdout_says(trapping, "ready"), what="the trap to be set")
    began = time.monotonic()
    stopped = json.loads(d.jwclient("--json", "stop", "--grace", "10", trapping["id"],
                                    check=True).stdout)
    took = time.monotonic() - began
    assert (stopped["state"], stopped["exit_code"], stopped["signal"]) == ("stopped", 7, None)
    assert took < 5
    wait_for(lambda: not processes_with(token), what="the namespace to go")

    ends = []
    for isolate in (["--isolate", "pid"], []):
        job = start(d, *isolate, "sleep", "3001")
        ends.append(json.loads(d.jwclient("--json", "stop", job["id"], check=True).stdout))
    assert [(r["state"], r["exit_code"], r["signal"]) for r in ends] == \
        [("stopped", None, "SIGTERM")] * 2


def test_a_signal_during_the_set_up_waits_for_the_program(isolating: Daemon) -> None:
    """A SIGTERM that reaches the helper before its init exists (here: already pending,
    blocked, as it execs) is passed on once the program runs, which ends by it."""
    exe, args, env = helper_command(["pid"], "/bin/sleep", ["sleep", "3002"],
                                    {"PATH": "/usr/bin:/bin"}, None)
    wrapper = ("import os, signal, sys\n"
               "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
               "os.kill(os.getpid(), signal.SIGTERM)\n"
               "os.execve(sys.argv[1], sys.argv[2:], {k: v for k, v in os.environ.items()})\n")
    proc = subprocess.Popen([exe, "-I", "-c", wrapper, exe, *args], env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_stop_during_the_set_up_is_held_for_the_program(isolating: Daemon) -> None:
    """A stop sent while the helper is still making the namespaces (start and stop back to
    back on one connection) reaches the program once it runs: SIGTERM, not the KILL."""
    conn = Conn(isolating, timeout=30)
    try:
        conn.hello()
        for _ in range(3):
            job = conn.call("start", {"command": "sleep", "args": ["3001"],
                                      "isolate": ["pid"]})
            began = time.monotonic()
            stopped = conn.call("stop", {"job": job["id"], "grace": 10})
            assert (stopped["state"], stopped["signal"]) == ("stopped", "SIGTERM"), stopped
            assert time.monotonic() - began < 5
    finally:
        conn.close()


def test_kill_after_the_grace_ends_the_whole_namespace(isolating: Daemon) -> None:
    """A program that ignores TERM is KILLed with the init; the kernel ends the rest of
    its namespace."""
    d = isolating
    token = f"jw-ns-{uuid.uuid4().hex[:8]}"
    job = start(d, "--isolate", "pid", "sh", "-c",
                f'trap "" TERM; echo ready; while :; do sleep 0.1; done # {token}')
    wait_for(lambda: stdout_says(job, "ready"), what="the job to ignore TERM")
    assert processes_with(token)
    stopped = json.loads(d.jwclient("--json", "stop", "--grace", "0.5", job["id"],
                                    check=True).stdout)
    assert (stopped["state"], stopped["signal"]) == ("stopped", "SIGKILL")
    wait_for(lambda: not processes_with(token), what="the namespace to go")


NET_SCRIPT = """
import socket, sys
print(socket.if_nameindex())
server = socket.create_server(("127.0.0.1", 0))
socket.create_connection(server.getsockname(), timeout=5).close()
print("lo up")
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("daemon reachable")
except OSError as e:
    print("daemon unreachable", type(e).__name__)
"""


def test_a_net_isolated_job_has_loopback_only(isolating: Daemon) -> None:
    """Its only interface is lo, up; the daemon's port on 127.0.0.1 is not there (and is
    without isolation)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    port = str(isolating.port)
    final, out, err = run(isolating, "--isolate", "net", SYSTEM_PYTHON, "-c", NET_SCRIPT, port)
    assert final["state"] == "exited" and final["exit_code"] == 0, err
    assert out.splitlines() == ["[(1, 'lo')]", "lo up", "daemon unreachable "
                                "ConnectionRefusedError"]
    assert final["isolate"] == ["net"]
    _, plain, _ = run(isolating, SYSTEM_PYTHON, "-c", NET_SCRIPT, port)
    assert plain.splitlines()[-1] == "daemon reachable"


def test_a_mount_isolated_job_has_a_private_empty_tmp(isolating: Daemon) -> None:
    """Its /tmp starts empty (the host's files are not there) and what it writes there
    never reaches the host's /tmp; environment, directory and stderr are the job's."""
    token = f"jw-ns-{uuid.uuid4().hex[:8]}"
    host_file = Path("/tmp") / f"{token}-host"
    host_file.write_text("host")
    try:
        final, out, err = run(isolating, "--isolate", "mount", "--env", "FOO=bar", "--dir",
                              "/usr", "sh", "-c",
                              f'ls -A /tmp | wc -l; echo x > /tmp/{token}; cat /tmp/{token};'
                              ' echo "$FOO"; pwd; id -u; echo err >&2')
    finally:
        host_file.unlink()
    assert final["state"] == "exited" and final["exit_code"] == 0, err
    count, written, foo, cwd, uid = out.split()
    assert (count, written, foo, cwd, err) == ("0", "x", "bar", "/usr", "err\n")
    assert int(uid) == final["uid"] != 0
    assert not (Path("/tmp") / token).exists()


def test_all_three_together_and_a_program_that_cannot_run(isolating: Daemon) -> None:
    """pid,net,mount at once; a program the helper cannot execute (hidden by the private
    /tmp) ends with 127 and says why on its stderr."""
    final, out, _ = run(isolating, "--isolate", "pid,net,mount", "sh", "-c",
                        "echo $$; ls -A /tmp | wc -l; ls /proc | grep -c '^[0-9]'")
    assert final["isolate"] == ["pid", "net", "mount"] and final["exit_code"] == 0
    assert out.split()[:2] == ["2", "0"]
    with tempfile.NamedTemporaryFile("w", dir="/tmp", suffix=".sh", delete=False) as f:
        f.write("#!/bin/sh\necho ran\n")
    try:
        os.chmod(f.name, 0o755)
        final, out, err = run(isolating, "--isolate", "mount", f.name)
    finally:
        os.unlink(f.name)
    assert (final["state"], final["exit_code"], out) == ("exited", 127, "")
    assert f"jobworker-nsinit: cannot execute {f.name}" in err
    # A directory the job's user may not enter: the helper entered it as root, the
    # program is refused there as it would have been without isolation.
    private = tempfile.mkdtemp(prefix="jw-ns-private-")  # 0700, root's
    try:
        final, out, err = run(isolating, "--isolate", "net", "--dir", private, "pwd")
        plain = json.loads(isolating.jwclient("--json", "start", "--dir", private,
                                              "pwd").stdout)  # exits 1: a failed start
    finally:
        os.rmdir(private)
    assert (final["exit_code"], out) == (126, "") and "Permission denied" in err
    assert plain["state"] == "failed" and "Permission denied" in plain["error"]


def test_retries_during_the_first_probe_start_one_job(isolating: Daemon,
                                                     make_daemon: Any) -> None:
    """Two starts with one request_id, sent together to a daemon whose probe has not run
    yet (both wait for it): one job, and the same record twice."""
    d = make_daemon()
    conn = Conn(d, timeout=30)
    try:
        conn.hello()
        params = {"command": "true", "isolate": ["net"], "request_id": "once"}
        conn.send({"id": 1, "method": "start", "params": params})
        conn.send({"id": 2, "method": "start", "params": params})
        replies = {r["id"]: r for r in (conn.read(), conn.read())}
    finally:
        conn.close()
    assert replies[1]["result"]["id"] == replies[2]["result"]["id"], replies
    jobs = json.loads(d.jwclient("--json", "list", check=True).stdout)
    assert len(jobs) == 1


def test_a_bad_isolate_value_is_bad_request(isolating: Daemon) -> None:
    """Over the wire, an unknown or repeated namespace is bad_request; jwclient refuses it
    before sending."""
    conn = Conn(isolating)
    try:
        conn.hello()
        for bad in (["bogus"], ["pid", "pid"], "pid"):
            conn.send({"id": 99, "method": "start",
                       "params": {"command": "true", "isolate": bad}})
            reply = conn.read()
            assert reply["error"]["code"] == "bad_request", reply
    finally:
        conn.close()
    refused = isolating.jwclient("start", "--isolate", "bogus", "true")
    assert refused.returncode == 2 and b"--isolate takes" in refused.stderr


def test_a_daemon_that_gave_up_root_refuses_isolation(test_pki: PKI, tmp_path: Path) -> None:
    """``twistd -u nobody``: start with isolate is bad_request saying why; without, jobs
    run as before."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a daemon that drops to nobody")
    with daemon_as_nobody(test_pki, tmp_path) as (d, _):
        refused = d.jwclient("start", "--dir", "/", "--isolate", "net", "true")
        assert refused.returncode != 0
        assert b"not root" in refused.stderr and b"--isolate" in refused.stderr
        final, _, _ = run(d, "--dir", "/", "true")
        assert final["state"] == "exited" and final["isolate"] is None
