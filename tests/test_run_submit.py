"""``jwclient run`` and ``jwclient submit`` against a real daemon: streamed output, exit
statuses, Ctrl-C, batch files, live progress and the summary; the human tables of ``list``
and ``status``."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, ROOT, Daemon

from jobworker.client import batch, render
from jobworker.wire.record import JobRecord

# Last resort; every wait below has its own deadline.
pytestmark = pytest.mark.timeout(120, method="thread")

WAIT = 20.0
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def jwclient_cmd(daemon: Daemon, *args: str) -> list[str]:
    return [str(BIN / "jwclient"), "--server", daemon.address, "--pki", str(daemon.pki.dir),
            "--identity", "alice", *args]


def record(daemon: Daemon, job: str) -> dict[str, object]:
    result = daemon.jwclient("--json", "status", job, check=True, timeout=WAIT)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def job_ids(daemon: Daemon) -> set[str]:
    listed = daemon.jwclient("--json", "list", check=True, timeout=WAIT).stdout
    return {r["id"] for r in json.loads(listed)}


def read_until(fd: int, predicate: object, timeout: float = WAIT) -> bytes:
    """Read ``fd`` until ``predicate(data)`` holds or EOF; fail after ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while not predicate(data):  # type: ignore[operator]
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout}s; read so far: {data!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            more = os.read(fd, 65536)
        except OSError:  # EIO: a pty whose other end has closed
            more = b""
        if not more:
            break
        data += more
    return data


def run_on_terminal(cmd: list[str], columns: int = 100) -> str:
    """Run ``cmd`` with stdout on a pseudo-terminal ``columns`` wide; return what it wrote
    there."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.Popen(cmd, stdout=terminal, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)
    os.close(terminal)
    try:
        out = read_until(controller, lambda data: False)
        proc.wait(WAIT)
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0
    return out.decode().replace("\r\n", "\n")


def write_batch(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- run ------------------------------------------------------------------------------------


def test_run_streams_stdout_and_stderr_and_exits_with_the_job_code(daemon: Daemon) -> None:
    """``run`` writes the job's stdout to stdout and its stderr to stderr, byte-exact, and
    exits with the job's exit code."""
    result = daemon.jwclient("run", "--", "sh", "-c",
                             "printf 'out\\n'; printf 'err\\n' >&2; printf tail; exit 7",
                             timeout=WAIT)
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\ntail", b"err\n")


@pytest.mark.parametrize("sig, status", [("KILL", 137), ("SEGV", 139)])
def test_run_exits_128_plus_n_for_a_job_killed_by_signal_n(daemon: Daemon, sig: str,
                                                          status: int) -> None:
    """A job killed by signal N makes ``run`` exit 128+N, as a shell would."""
    result = daemon.jwclient("run", "--", "sh", "-c", f"echo before; kill -{sig} $$",
                             timeout=WAIT)
    assert (result.returncode, result.stdout) == (status, b"before\n")


def test_run_exits_125_on_its_own_errors(daemon: Daemon) -> None:
    """A job that cannot start, or a daemon that cannot be reached, makes ``run`` exit 125
    with one line on stderr."""
    missing = daemon.jwclient("run", "--", "/no/such/program", timeout=WAIT)
    assert missing.returncode == 125
    assert missing.stderr.decode().count("\n") == 1
    assert "/no/such/program" in missing.stderr.decode()
    unreachable = subprocess.run(
        [str(BIN / "jwclient"), "--server", "127.0.0.1:1", "--pki", str(daemon.pki.dir),
         "--identity", "alice", "run", "--", "true"], capture_output=True, timeout=WAIT)
    assert unreachable.returncode == 125
    assert unreachable.stderr.decode().count("\n") == 1


def test_run_ctrl_c_stops_the_job_and_exits_with_its_status(daemon: Daemon) -> None:
    """SIGINT to ``run`` once output has arrived stops the job on the daemon (SIGTERM),
    says so on stderr, and exits 143 with the job's status."""
    proc = subprocess.Popen(
        jwclient_cmd(daemon, "run", "--", "sh", "-c", 'echo "$JOBWORKER_JOB_ID"; exec sleep 60'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        first = read_until(proc.stdout.fileno(), lambda data: b"\n" in data)
        job = first.decode().strip()
        assert UUID.fullmatch(job), first
        assert record(daemon, job)["state"] == "running"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 143
    lines = err.decode().splitlines()
    assert lines == [f"jwclient: interrupted: stopping job {job}",
                     f"jwclient: job {job} stopped (SIGTERM)"]
    final = record(daemon, job)
    assert (final["state"], final["signal"]) == ("stopped", "SIGTERM")


# -- submit ---------------------------------------------------------------------------------


def test_submit_starts_every_job_and_prints_their_ids(daemon: Daemon, tmp_path: Path) -> None:
    """Without --wait, ``submit`` starts all jobs and prints "ID  NAME" for each, in file
    order; args, env, dir and the default name reach the jobs."""
    batch = write_batch(tmp_path / "b.toml", f"""
[[job]]
name = "args"
command = "printf"
args = ["%s-%s", "a b", "c"]

[[job]]
name = "env-and-dir"
command = "sh"
args = ["-c", 'printf "%s in %s" "$GREETING" "$(pwd)"']
env = {{ GREETING = "hello" }}
dir = "{tmp_path}"

[[job]]
command = "true"
""")
    result = daemon.jwclient("submit", batch, check=True, timeout=WAIT)
    rows = [line.split("  ") for line in result.stdout.decode().splitlines()]
    assert [name for _, name in rows] == ["args", "env-and-dir", "job3"]
    assert all(UUID.fullmatch(job) for job, _ in rows)
    for job, _ in rows:
        daemon.jwclient("wait", job, check=True, timeout=WAIT)
    out = [daemon.jwclient("logs", job, check=True).stdout for job, _ in rows]
    assert out == [b"a b-c", f"hello in {tmp_path}".encode(), b""]


def test_submit_wait_shows_progress_and_a_summary_listing_the_failed_jobs(
        daemon: Daemon, tmp_path: Path) -> None:
    """``submit --wait`` with stdout not a terminal prints one plain line per job as it ends,
    then a summary table naming each job's result; it exits 1 since some failed."""
    batch = write_batch(tmp_path / "b.toml", """
[[job]]
name = "good"
command = "sh"
args = ["-c", "sleep 0.3"]

[[job]]
name = "bad"
command = "sh"
args = ["-c", "exit 3"]

[[job]]
name = "missing"
command = "/no/such/program"
""")
    result = daemon.jwclient("submit", "--wait", batch, timeout=WAIT)
    out = result.stdout.decode()
    assert result.returncode == 1
    assert "\x1b" not in out
    progress, summary = out.split("\n\n")
    assert sorted(line.split()[0] for line in progress.splitlines()) == ["bad", "good", "missing"]
    table = summary.splitlines()
    assert table[0].split() == ["NAME", "ID", "RESULT", "RUNTIME"]
    rows = {line.split()[0]: line for line in table[1:4]}
    assert "exited 0" in rows["good"]
    assert "exited 3" in rows["bad"]
    assert "failed: " in rows["missing"]
    assert table[4] == "1 of 3 jobs succeeded"
    assert "missing: " in result.stderr.decode()


def test_submit_json_prints_one_json_document_with_or_without_wait(daemon: Daemon) -> None:
    """With --json, stdout is one JSON array of job records, the final ones with --wait:
    no progress lines mixed in."""
    example = str(ROOT / "examples" / "batch.toml")
    started = json.loads(daemon.jwclient("--json", "submit", example, check=True).stdout)
    assert [UUID.fullmatch(r["id"]) is not None for r in started] == [True] * 3
    waited = daemon.jwclient("--json", "submit", "--wait", example, check=True, timeout=WAIT)
    finals = json.loads(waited.stdout)
    assert [(r["state"], r["exit_code"]) for r in finals] == [("exited", 0)] * 3


def test_submit_wait_redraws_progress_in_place_on_a_terminal(daemon: Daemon,
                                                            tmp_path: Path) -> None:
    """On a terminal, ``submit --wait`` redraws its status lines in place (cursor up, clear
    line) rather than appending, and ends with the summary; exit 0 when all succeed."""
    batch = write_batch(tmp_path / "b.toml", """
[[job]]
name = "quick"
command = "true"

[[job]]
name = "slow"
command = "sleep"
args = ["0.8"]
""")
    out = run_on_terminal(jwclient_cmd(daemon, "submit", "--wait", batch))
    assert out.count("\x1b[3F") >= 2  # redrawn at least once while "slow" ran, and at the end
    last = out.rsplit("\x1b[3F", 1)[1]
    assert "0 running, 0 queued, 2 done, 0 failed" in last
    assert re.search(r"quick\s+exited 0", last) and re.search(r"slow\s+exited 0", last)
    assert "2 of 2 jobs succeeded" in out


def ended(job_id: str, state: str = "exited", exit_code: int | None = 0,
          signal: str | None = None, error: str | None = None) -> JobRecord:
    return JobRecord(id=job_id, pid=1, command="true", args=[], dir="/", owner="alice",
                     state=state, exit_code=exit_code, signal=signal, error=error,
                     started_at="2026-11-28T04:10:00.000000Z",
                     ended_at="2026-11-28T04:10:01.500000Z", log_dir="/")


def test_summary_names_every_outcome_and_counts_successes() -> None:
    """The summary shows each job's result, including killed, stopped, failed, lost and
    never-started jobs, and counts only exit 0 as success."""
    names = ["ok", "code", "killed", "stopped", "failed", "lost", "refused"]
    specs = [batch.JobSpec(n, "true") for n in names]
    records = [ended("1"), ended("2", exit_code=3), ended("3", exit_code=None, signal="SIGKILL"),
               ended("4", "stopped", None, "SIGTERM"), ended("5", "failed", None, None, "nope"),
               ended("6", "lost", None, None, "status lost"), None]
    text = batch.summary(specs, records, 0.0)
    rows = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert ["exited 0" in rows["ok"], "exited 3" in rows["code"],
            "killed by SIGKILL" in rows["killed"], "stopped (SIGTERM)" in rows["stopped"],
            "failed: nope" in rows["failed"], "lost: status lost" in rows["lost"],
            "not started" in rows["refused"]] == [True] * 7
    assert "1.5s" in rows["ok"]
    assert text.splitlines()[-1] == "1 of 7 jobs succeeded"


def test_progress_on_a_terminal_draws_only_when_the_ticker_asks() -> None:
    """On a terminal, jobs ending write nothing themselves: a batch of N jobs costs N + 1
    lines per redraw (the counts alone past LINES_UP_TO jobs), not lines for each of the
    N endings."""
    for n, per_draw in ((40, 41), (200, 1)):
        out = io.StringIO()
        progress = batch.Progress(out, [f"job{i}" for i in range(n)], tty=True)
        for i in range(n):
            progress.update(i, ended(str(i)))
        assert out.getvalue() == ""
        progress.draw()
        progress.draw()
        text = out.getvalue()
        assert text.count("\n") == 2 * per_draw and text.count(f"\x1b[{per_draw}F") == 1
        assert text.endswith(f"0 running, 0 queued, {n} done, 0 failed\n")


def test_submit_wait_handles_more_jobs_than_requests_in_flight(daemon: Daemon,
                                                               tmp_path: Path) -> None:
    """A batch of 300 jobs, more than the daemon allows in flight on one connection, is
    started and waited for in full."""
    batch = write_batch(tmp_path / "b.toml",
                        '[[job]]\ncommand = "sleep"\nargs = ["0.5"]\n' * 300)
    result = daemon.jwclient("submit", "--wait", batch, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "300 of 300 jobs succeeded"


def test_the_example_batch_file_runs(daemon: Daemon) -> None:
    """examples/batch.toml, the documented example, is valid and all its jobs succeed."""
    result = daemon.jwclient("submit", "--wait", str(ROOT / "examples" / "batch.toml"),
                             timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "3 of 3 jobs succeeded"


def test_the_batch_example_in_the_docs_is_the_example_file() -> None:
    """docs/cli.md shows the same jobs as examples/batch.toml, so neither drifts."""
    docs = (ROOT / "docs" / "cli.md").read_text()
    shown = [block for block in re.findall(r"```toml\n(.*?)```", docs, re.S)
             if "[[job]]" in block]  # (the other is the configuration file's)
    assert len(shown) == 1
    example = (ROOT / "examples" / "batch.toml").read_text()
    assert tomllib.loads(shown[0]) == tomllib.loads(example)


BAD_BATCHES = [
    ("not toml [", "not valid TOML"),
    ("", "no [[job]] tables"),
    ('title = "x"\n[[job]]\ncommand = "true"\n', "only [[job]] tables"),
    ('[[job]]\nargs = ["x"]\n', "job 1: 'command' must be a non-empty string"),
    ('[[job]]\ncommand = "true"\n[[job]]\ncommand = "true"\nshell = true\n',
     "job 2: unknown keys shell"),
    ('[[job]]\ncommand = "true"\nenv = { N = 3 }\n', "'env' must be a table of strings"),
    ('[[job]]\ncommand = "true"\nargs = "x"\n', "'args' must be a list of strings"),
    ('[[job]]\ncommand = "true"\ntimeout = -1\n', "'timeout' must be a positive number"),
    ('[[job]]\ncommand = "true"\nmemory = "lots"\n',
     "job 1: 'memory' must be a size such as 512M or 1G, or a number of bytes, not 'lots'"),
]

#: Bad values of the keys a start's options have, and what the error says of each.
BAD_VALUES = [
    ("memory = 0", "'memory' must be a size"), ("memory = true", "'memory' must be a size"),
    ('io_read = "5Q"', "'io_read' must be bytes per second"),
    ("io_write = -1", "'io_write' must be bytes per second"),
    ('cpu = "half"', "'cpu' must be a positive number"), ("cpu = 0", "'cpu' must be"),
    ("pids = 1", "'pids' must be a whole number of processes, at least 2"),
    ("pids = 2.5", "'pids' must be a whole"), ('user = ""', "'user' must be a non-empty"),
    ('isolate = "pid"', "'isolate' must be a list"), ('isolate = ["pid", "pid"]', "distinct"),
    ('isolate = ["ipc"]', "names of pid, net, mount"),
]


def test_bad_limit_user_and_isolate_values_are_named(tmp_path: Path) -> None:
    """Each bad value of memory, cpu, pids, io_read, io_write, user or isolate is refused
    by the loader with the job and what the value must be (the real jwclient reaches this
    loader: see BAD_BATCHES)."""
    for i, (line, says) in enumerate(BAD_VALUES):
        path = write_batch(tmp_path / f"v{i}.toml", f'[[job]]\ncommand = "true"\n{line}\n')
        with pytest.raises(batch.BatchError, match=re.escape(says)):
            batch.load(path)


def test_submit_passes_limits_user_and_isolate_to_each_job(daemon: Daemon,
                                                           tmp_path: Path) -> None:
    """A batch file's memory, cpu, pids, io_read, io_write (sizes or numbers), user and
    isolate reach the daemon: the records say the limits, uid and namespaces applied."""
    path = write_batch(tmp_path / "limits.toml", """
[[job]]
name = "limited"
command = "true"
memory = "64M"
cpu = 0.5
pids = 16
io_read = "10M"
io_write = 1048576
user = "root"
isolate = ["mount"]

[[job]]
name = "plain"
command = "true"
""")
    result = daemon.jwclient("--json", "submit", "--wait", path, check=True, timeout=WAIT)
    limited, plain = json.loads(result.stdout)
    assert (limited["state"], limited["exit_code"]) == ("exited", 0), limited
    MiB = 1 << 20
    assert {k: limited["limits"][k] for k in ("memory", "cpu", "pids", "io_read",
                                              "io_write")} == {
        "memory": 64 * MiB, "cpu": 0.5, "pids": 16, "io_read": 10 * MiB, "io_write": MiB}
    assert limited["uid"] == 0 and limited["isolate"] == ["mount"]
    assert plain["limits"] is None and plain["isolate"] is None


def test_a_bad_batch_file_is_refused_with_one_line_and_nothing_started(
        daemon: Daemon, tmp_path: Path) -> None:
    """A malformed batch file starts no job, not even its valid ones: exit 2 and one line
    naming the file, the job and what is wrong."""
    before = job_ids(daemon)
    for i, (text, says) in enumerate(BAD_BATCHES):
        path = write_batch(tmp_path / f"bad{i}.toml", text)
        result = daemon.jwclient("submit", path, timeout=WAIT)
        err = result.stderr.decode()
        assert (result.returncode, err.count("\n")) == (2, 1), (text, err)
        assert path in err and says in err, (text, err)
    assert job_ids(daemon) == before


# -- human output of list and status ---------------------------------------------------------


def test_status_names_each_limit_io_included() -> None:
    """status's limits line: sizes in binary units, io per second, '-' for unlimited."""
    limits = {"memory": 512 << 20, "cpu": 0.5, "pids": 64, "io_read": 10 << 20,
              "io_write": None, "io_devices": ["254:0"]}
    assert render.limits(limits) == ("memory 512.0 MiB, cpu 0.5, pids 64, "
                                     "io read 10.0 MiB/s, write -")


def test_list_is_an_aligned_table_with_relative_times_and_durations(daemon: Daemon) -> None:
    """``list`` prints aligned columns with "ago" times and run times and shell-quoted
    commands; on a terminal every row fits its width (long cells cut with an ellipsis,
    a long failure reason included), ``--wide`` or off a terminal nothing is cut; a job
    that never ran has no run time."""
    long_arg = "x" * 80
    short = daemon.jwclient("start", "--", "sh", "-c", "exit 3", check=True).stdout.decode()
    long = daemon.jwclient("start", "--", "echo", long_arg, check=True).stdout.decode()
    missing = "/no/such/program/" + "deep/" * 12 + "tool"
    never = json.loads(daemon.jwclient("--json", "start", missing).stdout)["id"]
    for job in (short.strip(), long.strip()):
        daemon.jwclient("wait", job, timeout=WAIT)
    for out, cut in ((daemon.jwclient("list", check=True).stdout.decode(), False),
                     (run_on_terminal(jwclient_cmd(daemon, "list"), 100), True),
                     (run_on_terminal(jwclient_cmd(daemon, "list", "--wide"), 100), False)):
        header, *rows = out.splitlines()
        assert header.split() == ["ID", "PID", "STATE", "OWNER", "STARTED", "RUNTIME",
                                  "COMMAND"]
        # On a narrow terminal an id is shortened to its first 8 characters (a prefix
        # every command accepts).
        mine = {full: row for row in rows for full in (short.strip(), long.strip(), never)
                if full.startswith(row.split()[0])}
        row = mine[short.strip()]
        for column, text in (("STATE", "exited 3"), ("OWNER", "alice"),
                             ("COMMAND", "sh -c 'exit 3'")):
            assert row[header.index(column):].startswith(text), (column, row)
        started = row[header.index("STARTED"):header.index("RUNTIME")].strip()
        assert started == "just now" or started.endswith(" ago")
        assert re.fullmatch(r"\d+ms|\d+\.\ds", row[header.index("RUNTIME"):].split()[0])
        assert mine[never][header.index("RUNTIME"):].split()[0] == "-"
        command = mine[long.strip()][header.index("COMMAND"):]
        if cut:
            assert max(len(line) for line in out.splitlines()) <= 100, out
            assert command.endswith("…") and f"echo {long_arg}".startswith(command[:-1])
            assert mine[never][header.index("STATE"):].split("  ")[0].endswith("…")
        else:
            assert command == f"echo {long_arg}"
            assert missing in mine[never]


def test_status_is_aligned_and_json_is_the_record(daemon: Daemon) -> None:
    """``status`` prints aligned "key: value" lines with relative times and a run time;
    ``--json status`` prints the wire record, unchanged."""
    job = daemon.jwclient("start", "--", "sh", "-c", "exit 3", check=True).stdout.decode()
    job = job.strip()
    daemon.jwclient("wait", job, timeout=WAIT)
    lines = daemon.jwclient("status", job, check=True).stdout.decode().splitlines()
    fields = {line.split(":", 1)[0]: line for line in lines}
    assert list(fields)[:4] == ["id", "state", "command", "pid"]
    assert len({len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}) == 1
    assert fields["state"].split(None, 1)[1] == "exited 3"
    assert re.search(r"Z \((just now|.* ago)\)$", fields["started"])
    assert re.search(r"Z \((just now|.* ago)\)$", fields["ended"])
    assert re.fullmatch(r"runtime:\s+(\d+ms|\d+\.\ds)", fields["runtime"])
    wire = json.loads(daemon.jwclient("--json", "status", job, check=True).stdout)
    assert set(wire) == set(JobRecord.__dataclass_fields__)
    assert (wire["id"], wire["state"], wire["exit_code"]) == (job, "exited", 3)


def test_submit_queue_priority_after_and_unique_names(make_daemon: Any, tmp_path: Path) -> None:
    """A submit file's queue, priority, labels, after (by the file's names) and
    unique_names reach the daemon: with --max-running 1 the job after another starts only
    once that one has exited 0, and --wait's lines carry the running/queued/done/failed
    counts."""
    d = make_daemon("--max-running", "1")
    path = write_batch(tmp_path / "b.toml", """
unique_names = true

[[job]]
name = "first"
command = "sleep"
args = ["0.3"]
labels = { step = "one" }

[[job]]
name = "second"
command = "true"
after = ["first"]
queue = "default"
priority = 0
""")
    result = d.jwclient("--json", "submit", "--wait", path, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert (first["name"], second["name"]) == ("first", "second")
    assert first["labels"] == {"step": "one"} and second["after"] == [first["id"]]
    assert second["started_at"] >= first["ended_at"]
    lines = d.jwclient("submit", "--wait", path, timeout=WAIT).stdout.decode()
    assert "(0 running, 0 queued, 2 done, 0 failed)" in lines, lines
    bad = write_batch(tmp_path / "bad.toml", '[[job]]\ncommand = "true"\nafter = ["x"]\n')
    refused = d.jwclient("submit", bad)
    assert refused.returncode == 2 and b"not an earlier job" in refused.stderr
