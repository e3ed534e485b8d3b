"""``jwclient`` at a terminal and in pipelines: Ctrl-C, closed pipes, what ``run`` says,
``--json`` anywhere and for errors, several ids to ``wait``, ``logs --tail``, help,
``--version`` and completion.  The real jwclient against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import BIN, Daemon, wait_for

import jobworker
from jobworker.client import Client

pytestmark = pytest.mark.timeout(60, method="thread")

WAIT = 20.0


def argv(daemon: Daemon, *args: str) -> list[str]:
    return [str(BIN / "jwclient"), "--server", daemon.address, "--pki", str(daemon.pki.dir),
            "--identity", "alice", *args]


def client(daemon: Daemon) -> Client:
    return Client(daemon.address, pki=str(daemon.pki.dir), identity="alice")


def started_and_waiting(proc: subprocess.Popen[bytes], daemon: Daemon, job: str) -> None:
    """Until ``proc`` has its request in (the daemon holds a wait or a follow for it)."""
    def connected() -> bool:
        return any(f"{daemon.port}" in line and "ESTAB" in line for line in subprocess.run(
            ["ss", "-tnp"], capture_output=True, text=True, check=False).stdout.splitlines()
            if f"pid={proc.pid}," in line)
    wait_for(connected, WAIT, what="jwclient's connection")


@pytest.mark.parametrize("command", [["logs", "-f"], ["wait"], ["submit", "--wait"]])
def test_ctrl_c_ends_a_follow_or_a_wait_quietly_with_130(
        daemon: Daemon, command: list[str], tmp_path: os.PathLike[str]) -> None:
    """SIGINT while ``logs -f``, ``wait`` or ``submit --wait`` waits: exit 130, nothing
    on stderr, the job left running."""
    with client(daemon) as c:
        job = c.start("sleep", ["30"])
        if command[0] == "submit":
            batch = os.path.join(tmp_path, "b.toml")
            with open(batch, "w") as f:
                f.write('[[job]]\ncommand = "sleep"\nargs = ["30"]\n')
            args = [*command, batch]
        else:
            args = [*command, job.id]
        proc = subprocess.Popen(argv(daemon, *args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            started_and_waiting(proc, daemon, job.id)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert (proc.returncode, err) == (130, b"")
        assert c.status(job.id).state == "running"
        for ref in [job.id, *(r.id for r in c.list(state="running") if r.command == "sleep")]:
            c.stop(ref, grace=0.5)


def test_a_closed_pipe_ends_logs_f_with_141_and_run_stops_its_job(daemon: Daemon) -> None:
    """``logs -f | head -1`` and ``run ... | head -1``: exit 141, quietly; ``run`` stops
    its job (``logs -f`` leaves it alone)."""
    script = 'echo "$JOBWORKER_JOB_ID"; while :; do echo more; sleep 0.05; done'
    with client(daemon) as c:
        followed = c.start("sh", ["-c", script])
        for args in (["logs", "-f", followed.id], ["run", "--", "sh", "-c", script]):
            shell = subprocess.run(
                ["bash", "-c", 'set -o pipefail; "$@" | head -1; echo "${PIPESTATUS[0]}" >&2',
                 "-", *argv(daemon, *args)],
                capture_output=True, timeout=WAIT, stdin=subprocess.DEVNULL)
            job = shell.stdout.decode().strip()
            assert shell.stderr.decode().strip() == "141", shell.stderr
            if args[0] == "logs":
                assert job == followed.id and c.status(job).state == "running"
            else:
                ended = c.wait(job)
                assert (ended.state, ended.signal) == ("stopped", "SIGTERM")
        c.stop(followed.id, grace=0.5)


def test_run_says_why_a_timed_out_job_ended_and_warns_of_piped_stdin(daemon: Daemon) -> None:
    """A timed-out ``run`` names the cause on stderr and exits 143; input piped into
    ``run`` gets one warning; none without it."""
    timed = subprocess.run(argv(daemon, "run", "--timeout", "0.3s", "--", "sleep", "5"),
                           capture_output=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    lines = timed.stderr.decode().splitlines()
    assert timed.returncode == 143 and len(lines) == 1, timed.stderr
    assert lines[0].startswith("jwclient: job ") and "timed out" in lines[0]
    piped = subprocess.run(argv(daemon, "run", "cat"), input=b"hello\n", capture_output=True,
                           timeout=WAIT)
    assert piped.returncode == 0 and piped.stdout == b""
    assert piped.stderr.decode().count("warning") == 1 and b"/dev/null" in piped.stderr
    quiet = subprocess.run(argv(daemon, "run", "true"), capture_output=True, timeout=WAIT,
                           stdin=subprocess.DEVNULL)
    assert (quiet.returncode, quiet.stderr) == (0, b"")


def test_json_before_or_after_the_command_never_from_the_program(daemon: Daemon) -> None:
    """``status ID --json`` is JSON; in ``run echo --json`` the flag is the program's."""
    with client(daemon) as c:
        job = c.start("true")
    after = subprocess.run(argv(daemon, "status", job.id, "--json"), capture_output=True,
                           timeout=WAIT, check=True)
    assert json.loads(after.stdout)["id"] == job.id
    echoed = subprocess.run(argv(daemon, "run", "echo", "--json"), capture_output=True,
                            timeout=WAIT, stdin=subprocess.DEVNULL)
    assert (echoed.returncode, echoed.stdout) == (0, b"--json\n")


@pytest.mark.parametrize("command, status", [("status", 1), ("wait", 125)])
def test_errors_are_plain_words_or_a_json_error(daemon: Daemon, command: str,
                                                status: int) -> None:
    """'jwclient: no job X' on stderr, or with --json {"error": {code, message}} on
    stdout, with the same exit status."""
    plain = subprocess.run(argv(daemon, command, "deadbeef-nope"), capture_output=True,
                           timeout=WAIT)
    assert (plain.returncode, plain.stdout) == (status, b"")
    assert plain.stderr == b"jwclient: no job deadbeef-nope\n"
    as_json = subprocess.run(argv(daemon, command, "--json", "deadbeef-nope"),
                             capture_output=True, timeout=WAIT)
    assert as_json.returncode == status and as_json.stderr == b""
    assert json.loads(as_json.stdout) == {
        "error": {"code": "not_found", "message": "no job deadbeef-nope"}}


def test_wait_takes_several_ids_and_exits_by_the_rules(daemon: Daemon) -> None:
    """125 if any could not start, else the first non-zero status in argument order,
    else 0."""
    with client(daemon) as c:
        ok, three, five = (c.start("sh", ["-c", f"exit {n}"]).id for n in (0, 3, 5))
        never = c.start("/no/such/program").id

    def wait(*ids: str) -> int:
        return subprocess.run(argv(daemon, "wait", *ids), capture_output=True,
                              timeout=WAIT).returncode

    assert wait(ok, ok) == 0
    assert wait(ok, five, three) == 5
    assert wait(three, five) == 3
    assert wait(ok, never, three) == 125


def test_logs_tail_prints_the_last_lines_then_follows(daemon: Daemon) -> None:
    """``--tail 2`` prints the last two lines; with -f, then what comes after, once."""
    with client(daemon) as c:
        job = c.start("sh", ["-c", "seq 5; sleep 0.5; echo after"])
        c.wait(job.id)
        done = subprocess.run(argv(daemon, "logs", "--tail", "2", job.id), capture_output=True,
                              timeout=WAIT, check=True)
        assert done.stdout == b"5\nafter\n"
        live = c.start("sh", ["-c", "seq 5; sleep 0.3; echo after"])
        followed = subprocess.run(argv(daemon, "logs", "-f", "--tail", "1", live.id),
                                  capture_output=True, timeout=WAIT, check=True)
        assert followed.stdout.endswith(b"after\n") and followed.stdout.count(b"after") == 1
        assert followed.stdout.splitlines()[0] in (b"1", b"2", b"3", b"4", b"5", b"after")


def test_usage_help_version_and_completion() -> None:
    """Help without RST markup; --version; a misleading argparse message replaced; a
    duration out of range says the range; bash and zsh completion from the parser."""
    def jw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "jwclient"), *args], capture_output=True, text=True,
                              timeout=WAIT)

    for args in (["--help"], ["start", "--help"], ["logs", "--help"]):
        shown = jw(*args)
        assert shown.returncode == 0 and "``" not in shown.stdout and "jwclient" in shown.stdout
    assert jw("--version").stdout == f"jwclient {jobworker.__version__}\n"
    dash = jw("--pki", "/p", "--identity", "a", "start", "-x")
    assert dash.returncode == 2 and "put --" in dash.stderr and "args" not in dash.stderr
    grace = jw("--pki", "/p", "--identity", "a", "stop", "--grace", "0", "x")
    assert grace.returncode == 2 and "more than 0" in grace.stderr
    for shell in ("bash", "zsh"):
        script = jw("completion", shell)
        assert script.returncode == 0 and "submit" in script.stdout and "--follow" in script.stdout
