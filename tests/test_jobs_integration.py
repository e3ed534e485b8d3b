"""Jobs against a real daemon: exact results, stop escalation, failures, leaks, scale."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import Daemon, dead, fds_but_spares, wait_for, zombie_children
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from jobworker.client.api import Client, connect
from jobworker.jobs import logpool
from jobworker.jobs.logs import spread_subdirectories
from jobworker.wire.record import JobRecord

PY = sys.executable
RECORD_FIELDS = {"id", "pid", "command", "args", "dir", "owner", "state", "exit_code",
                 "signal", "error", "started_at", "ended_at", "log_dir", "timed_out",
                 "timeout", "uid", "gid", "isolate", "usage", "limits", "oom_killed",
                 "queued_at", "queue", "priority", "after", "name", "labels"}


def start(daemon: Daemon, *argv: str, identity: str = "alice") -> str:
    out = daemon.jwclient("start", "--", *argv, identity=identity, check=True).stdout
    job_id = out.decode().strip()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        job_id), out
    return job_id


def record(daemon: Daemon, ref: str | int, identity: str = "alice") -> dict[str, Any]:
    result = daemon.jwclient("--json", "status", str(ref), identity=identity, check=True)
    return json.loads(result.stdout)


def log_bytes(rec: dict[str, Any], stream: str = "stdout") -> bytes:
    return (Path(rec["log_dir"]) / f"{stream}.log").read_bytes()


def wait_for_output(rec: dict[str, Any], needle: bytes, timeout: float = 10.0) -> bytes:
    return wait_for(lambda: needle in log_bytes(rec) and log_bytes(rec), timeout,
                    what=f"{needle!r} in the job's stdout")


@pytest.mark.parametrize("code", [0, 1, 255])
def test_exit_codes_are_exact(daemon: Daemon, code: int) -> None:
    """wait reports the job's own exit code and exits with it."""
    job_id = start(daemon, "sh", "-c", f"exit {code}")
    result = daemon.jwclient("--json", "wait", job_id)
    assert result.returncode == code
    rec = json.loads(result.stdout)
    assert (rec["state"], rec["exit_code"], rec["signal"]) == ("exited", code, None)
    assert set(rec) == RECORD_FIELDS


def caught_signals(pid: int) -> set[int]:
    """The signals ``pid`` has a handler for (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def test_the_daemon_reaps_jobs_without_a_sigchld_handler(daemon: Daemon) -> None:
    """Jobs are reaped through their pidfds, so the daemon takes the reactor's SIGCHLD
    handler off (each exit would cost it a signal and a wake-up) yet sees every end, with
    its status, and leaves no zombie."""
    wait_for(lambda: signal.SIGCHLD not in caught_signals(daemon.pid), 10,
             what="the daemon to take its SIGCHLD handler off")
    assert signal.SIGTERM in caught_signals(daemon.pid)  # its other handlers stay
    ids = [start(daemon, "sh", "-c", f"exit {code}") for code in (0, 3, 7)]
    for job_id, code in zip(ids, (0, 3, 7), strict=True):
        result = daemon.jwclient("--json", "wait", job_id)
        assert json.loads(result.stdout)["exit_code"] == code
    assert zombie_children(daemon.pid) == []


def test_killed_by_signal_reports_signal_and_128_plus_n(daemon: Daemon) -> None:
    """A job killed by a signal has signal set, no exit code, and wait exits 128+N."""
    job_id = start(daemon, "sh", "-c", "kill -KILL $$")
    result = daemon.jwclient("--json", "wait", job_id)
    rec = json.loads(result.stdout)
    assert (rec["state"], rec["exit_code"], rec["signal"]) == ("exited", None, "SIGKILL")
    assert result.returncode == 128 + signal.SIGKILL


def test_start_prints_id_alone_and_json_record(daemon: Daemon, test_pki: Any) -> None:
    """start prints only the id; --json prints the whole record with every field."""
    job_id = start(daemon, "echo", "hi")
    out = daemon.jwclient("--json", "start", "--", "echo", "hi", check=True).stdout
    rec = json.loads(out)
    assert set(rec) == RECORD_FIELDS and rec["owner"] == "alice"
    assert rec["command"] == "echo" and rec["args"] == ["hi"]
    assert rec["started_at"].endswith("Z") and rec["state"] in ("running", "exited")
    logs = daemon.state_dir / "logs"
    assert Path(rec["log_dir"]).parent == logs
    assert re.fullmatch(re.escape(rec["id"]) + r"-\d{8}T\d{6}\.\d{6}Z",
                        Path(rec["log_dir"]).name)
    daemon.jwclient("wait", job_id, check=True)
    assert log_bytes(record(daemon, job_id)) == b"hi\n"


def test_all_byte_values_round_trip_stdout_and_stderr(daemon: Daemon) -> None:
    """Every byte value survives stdout and stderr, through the files and `jwclient logs`."""
    payload = bytes(range(256)) * 64
    script = ("import sys; b = bytes(range(256)) * 64; "
              "sys.stdout.buffer.write(b); sys.stderr.buffer.write(b[::-1])")
    job_id = start(daemon, PY, "-c", script)
    daemon.jwclient("wait", job_id, check=True)
    out = daemon.jwclient("logs", job_id, check=True).stdout
    err = daemon.jwclient("logs", "--stderr", job_id, check=True).stdout
    assert out == payload
    assert err == payload[::-1]
    assert daemon.jwclient("logs", "--offset", "1000", job_id, check=True).stdout \
        == payload[1000:]


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(daemon: Daemon) -> None:
    """A job ignoring SIGTERM is SIGKILLed after the grace; the record says stopped."""
    script = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print('ready', flush=True); time.sleep(60)")
    job_id = start(daemon, PY, "-c", script)
    wait_for_output(record(daemon, job_id), b"ready")
    result = daemon.jwclient("--json", "stop", "--grace", "0.5", job_id, check=True)
    rec = json.loads(result.stdout)
    assert (rec["state"], rec["signal"]) == ("stopped", "SIGKILL")


def test_stop_with_cooperative_job_uses_sigterm(daemon: Daemon) -> None:
    """A job that exits on SIGTERM is stopped by it, before any SIGKILL."""
    job_id = start(daemon, "sleep", "60")
    rec = json.loads(daemon.jwclient("--json", "stop", job_id, check=True).stdout)
    assert (rec["state"], rec["signal"], rec["exit_code"]) == ("stopped", "SIGTERM", None)
    again = json.loads(daemon.jwclient("--json", "stop", job_id, check=True).stdout)
    assert again == rec  # stopping an ended job is not an error


def test_stop_kills_the_jobs_children_too(daemon: Daemon) -> None:
    """stop signals the whole process group, so the job's children die with it."""
    job_id = start(daemon, "sh", "-c", "sleep 300 & echo $!; wait")
    rec = record(daemon, job_id)
    child = int(wait_for_output(rec, b"\n").split()[0])
    assert not dead(child)
    daemon.jwclient("stop", "--grace", "2", job_id, check=True)
    wait_for(lambda: dead(child), 10, what="the child to die")


def test_timeout_stops_job_and_marks_record(daemon: Daemon) -> None:
    """A job over its run-time limit is stopped and its record says timed_out."""
    job_id = daemon.jwclient("start", "--timeout", "300ms", "--", "sleep", "30",
                             check=True).stdout.decode().strip()
    result = daemon.jwclient("--json", "wait", job_id)
    rec = json.loads(result.stdout)
    assert (rec["state"], rec["timed_out"], rec["signal"]) == ("stopped", True, "SIGTERM")
    assert rec["timeout"] == pytest.approx(0.3)
    assert result.returncode == 128 + signal.SIGTERM


@pytest.mark.parametrize("argv, error", [
    (["no-such-program-xyz"], "no such program"),
    (["/etc/passwd"], "not executable"),
    (["--dir", "/no/such/dir", "--", "true"], "no such directory"),
])
def test_start_failures_keep_a_failed_record(daemon: Daemon, argv: list[str],
                                             error: str) -> None:
    """A job that cannot start is recorded as failed with a clear error; jwclient exits 1."""
    args = argv if "--" in argv else ["--", *argv]
    result = daemon.jwclient("start", *args)
    assert result.returncode == 1
    line = result.stderr.decode()
    assert line.startswith("jwclient: ") and error in line and line.count("\n") == 1
    job_id = re.search(r"job ([0-9a-f-]{36})", line).group(1)  # type: ignore[union-attr]
    rec = record(daemon, job_id)
    assert rec["state"] == "failed" and error in rec["error"] and rec["pid"] is None
    assert rec["ended_at"] is not None


@pytest_twisted.ensureDeferred
async def test_bad_env_entry_fails_the_start(daemon: Daemon) -> None:
    """An env entry without '=' or with NUL is a failed start, not a crash."""
    client = await connect(reactor, daemon.config())
    try:
        for entry in ("NOEQUALS", "A=b\0c", "=x"):
            rec = JobRecord.from_wire(await client.call(
                "start", {"command": "true", "env": [entry]}))
            assert rec.state == "failed" and "env" in (rec.error or ""), entry
    finally:
        client.close()


def test_environment_is_minimal_and_request_env_applies(daemon: Daemon) -> None:
    """A job sees only the documented base environment plus the request's env."""
    job_id = daemon.jwclient("start", "--env", "FOO=bar baz", "--env", "PATH=/usr/bin:/bin",
                             "--", "env", check=True).stdout.decode().strip()
    daemon.jwclient("wait", job_id, check=True)
    env = dict(line.split("=", 1) for line in
               log_bytes(record(daemon, job_id)).decode().splitlines())
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", "JOBWORKER_JOB_ID", "FOO"}
    assert env["FOO"] == "bar baz" and env["PATH"] == "/usr/bin:/bin"
    assert env["JOBWORKER_JOB_ID"] == job_id


def test_working_directory_and_descriptors(daemon: Daemon, tmp_path: Path) -> None:
    """dir is honoured, stdin is /dev/null, and the job has no descriptor but 0, 1, 2."""
    script = ("import os; print(os.getcwd()); print(os.readlink('/proc/self/fd/0')); "
              "fds = []\n"
              "for fd in range(3, 4096):\n"
              "    try: os.fstat(fd)\n"
              "    except OSError: continue\n"
              "    fds.append(fd)\n"
              "print(fds); print(os.getsid(0) == os.getpid())")
    job_id = daemon.jwclient("start", "--dir", str(tmp_path), "--", PY, "-c", script,
                             check=True).stdout.decode().strip()
    daemon.jwclient("wait", job_id, check=True)
    cwd, stdin, fds, leader = log_bytes(record(daemon, job_id)).decode().splitlines()
    assert (cwd, stdin, fds, leader) == (str(tmp_path), "/dev/null", "[]", "True")


def test_status_by_pid_and_wait_on_running_then_ended(daemon: Daemon) -> None:
    """status finds a job by pid; wait blocks while it runs and answers at once after."""
    job_id = start(daemon, "sh", "-c", "read x < /dev/null; sleep 0.3; exit 7")
    rec = record(daemon, job_id)
    by_pid = record(daemon, rec["pid"])
    assert by_pid["id"] == job_id
    first = daemon.jwclient("--json", "wait", job_id)
    assert first.returncode == 7 and json.loads(first.stdout)["state"] == "exited"
    second = daemon.jwclient("--json", "wait", job_id)
    assert second.returncode == 7 and json.loads(second.stdout) == json.loads(first.stdout)


def test_list_newest_first_and_running_filter(daemon: Daemon) -> None:
    """list is newest first; --running shows only running jobs."""
    a = start(daemon, "true")
    b = start(daemon, "sleep", "30")
    ids = [r["id"] for r in json.loads(daemon.jwclient("--json", "list", check=True).stdout)]
    assert ids.index(b) < ids.index(a)
    running = json.loads(daemon.jwclient("--json", "list", "--running", check=True).stdout)
    assert b in {r["id"] for r in running}
    assert all(r["state"] == "running" for r in running)
    daemon.jwclient("stop", b, check=True)


@pytest_twisted.ensureDeferred
async def test_list_of_records_too_big_for_one_frame_arrives_whole(daemon: Daemon) -> None:
    """Thirty records of ~60 KiB each (one long argument) are 1.8 MiB together: list still
    returns every one of them, split over several chunk frames under the 1 MiB limit."""
    client = await connect(reactor, daemon.config("alice"))
    try:
        ids = []
        for n in range(30):
            rec = await client.start("true", [f"{n:02d}" + "x" * 60_000])
            ids.append(rec.id)
        chunks: list[int] = []
        reply = await client.call("list", {}, on_chunk=lambda c: chunks.append(len(c)))
        listed = await client.list()
    finally:
        client.close()
    assert reply["count"] >= 30 and sum(chunks) == reply["count"]
    assert len(chunks) >= 7  # at most four 60 KiB records fit in 256 KiB
    by_id = {r.id: r for r in listed}
    assert all(len(by_id[i].args[0]) == 60_002 for i in ids)


@pytest_twisted.ensureDeferred
async def test_ten_clients_hundred_jobs_each_exact(daemon: Daemon) -> None:
    """10 clients start 100 jobs each concurrently; every output and exit code is exact."""
    clients = [await connect(reactor, daemon.config(who))
               for who in ("alice", "bob") * 5]

    async def one(client: Client, n: int) -> tuple[int, JobRecord]:
        rec = await client.start("sh", ["-c", 'printf "%s" "$1"; exit $(($2 % 256))', "sh",
                                        f"token-{n}", str(n)])
        return n, JobRecord.from_wire(await client.call("wait", {"job": rec.id}))

    try:
        results = await DeferredList(
            [Deferred.fromCoroutine(one(c, i * 100 + j))
             for i, c in enumerate(clients) for j in range(100)], fireOnOneErrback=True)
    finally:
        for c in clients:
            c.close()
    assert len(results) == 1000
    for _, (n, rec) in results:
        assert rec.state == "exited" and rec.exit_code == n % 256
        assert (Path(rec.log_dir) / "stdout.log").read_bytes() == f"token-{n}".encode()


def test_daemon_sweeps_leftover_spares_uses_spares_and_removes_them_at_stop(
        make_daemon: Any, tmp_path: Path) -> None:
    """A daemon sweeps the spare directories a crashed one left, gives a job a spare made
    ahead of time (renamed: its fds 1 and 2 are the job's files), and removes the spares
    when it stops."""
    spare_root = tmp_path / "state0" / "logs" / ".spare"
    leftover = spare_root / "9" / "77"
    leftover.mkdir(parents=True)
    (leftover / "stdout.log").write_bytes(b"from a crash")
    d = make_daemon()
    # A whole first batch made: it is handed over long before jwclient has even started.
    wait_for(lambda: not leftover.exists() and len(spare_inodes(spare_root)) >= logpool.BATCH,
             what="leftovers swept and spares made")
    ready = spare_inodes(spare_root)
    job_id = start(d, "sh", "-c", "readlink /proc/self/fd/1; readlink /proc/self/fd/2")
    d.jwclient("wait", job_id, check=True)
    rec = record(d, job_id)
    log_dir = Path(rec["log_dir"])
    assert log_dir.stat().st_ino in ready
    assert log_bytes(rec).decode().splitlines() == [str(log_dir / "stdout.log"),
                                                    str(log_dir / "stderr.log")]
    assert d.stop() in (0, -signal.SIGTERM)
    assert not spare_root.exists()


def test_the_daemon_marks_the_spare_root_to_spread_spares(daemon: Daemon) -> None:
    """The spares' root is marked FS_TOPDIR_FL (see logs.py); the log root starts plain."""
    from test_logs import topdir_flag

    root = daemon.state_dir / "logs"
    wait_for(lambda: (root / ".spare").is_dir(), what="spares made at start")
    probe = root.parent / "probe-topdir"
    probe.mkdir(exist_ok=True)
    if not spread_subdirectories(str(probe)):
        pytest.skip(f"{root} is not on ext2/3/4")
    assert topdir_flag(root / ".spare")


def spare_inodes(spare_root: Path) -> set[int]:
    """Inode numbers of the spare directories with both their files made."""
    if not spare_root.exists():
        return set()
    return {spare.stat().st_ino for group in spare_root.iterdir() for spare in group.iterdir()
            if (spare / "stdout.log").exists() and (spare / "stderr.log").exists()}


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_no_zombies_and_fd_count_back_to_baseline_after_500_jobs(
        make_daemon: Any) -> None:
    """After 500 jobs the daemon has no zombie children and its descriptors are back
    (spare log directories included: once the pool has refilled, exactly as many)."""
    d = make_daemon()
    client = await connect(reactor, d.config())

    async def one(i: int) -> None:
        rec = await client.start("true")
        await client.call("wait", {"job": rec.id})

    await one(0)  # let lazily made fds appear (stdin's /dev/null)
    baseline = fds_but_spares(d.pid)

    for _ in range(5):
        await DeferredList([Deferred.fromCoroutine(one(i)) for i in range(100)],
                           fireOnOneErrback=True)
    assert zombie_children(d.pid) == []
    assert fds_but_spares(d.pid) == baseline
    client.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_thousand_running_jobs_then_sigterm_stops_them_all(make_daemon: Any) -> None:
    """1,000 jobs run at once; SIGTERM to twistd stops every one (TERM, then KILL)."""
    d = make_daemon("--grace", "1")
    client = await connect(reactor, d.config())
    script = "trap '' TERM; exec sleep 120"
    recs: list[JobRecord] = []
    for _ in range(10):
        results = await DeferredList(
            [Deferred.fromCoroutine(client.start("sh", ["-c", script] if i % 2 else
                                                 ["-c", "exec sleep 120"]))
             for i in range(100)], fireOnOneErrback=True)
        recs.extend(r for _, r in results)
    assert all(r.state == "running" for r in recs)
    assert len(await client.list(running=True)) == 1000
    client.close()
    pids = [r.pid for r in recs]
    assert d.stop(timeout=60) in (0, -signal.SIGTERM)  # twistd re-raises SIGTERM on exit
    for pid in pids:
        assert pid is not None and dead(pid)
    ended = re.findall(r"job\.ended .*state=stopped", d.log())
    assert len(ended) == 1000
