"""What every benchmark shares: a throwaway PKI, a real ``twistd jobworker`` on 127.0.0.1,
connected clients, statistics, bare baselines, and the result format run_all.py collects.

Everything talks to 127.0.0.1 only.  The daemon runs in its own process group and is ended
by pid (SIGTERM, then SIGKILL of its group after a deadline); long-running jobs a benchmark
starts are remembered by pid and swept the same way if the daemon left them behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if importlib.util.find_spec("jobworker") is None:  # not installed: use this checkout
    sys.path.insert(0, str(ROOT))

from jobworker import pki  # noqa: E402 (after the sys.path fallback above)

#: run_all.py sets this: every daemon and long-running job we start is appended to it, so
#: a script killed for overrunning its budget leaves nothing behind.
PIDFILE = os.environ.get("JW_BENCH_PIDFILE")

#: run_all.py sets this too: finished temp dirs are moved here and deleted at the end of
#: the suite.  This ext4 has no journal, so it skips every inode freed in the last ~35 s
#: when allocating one: deleting a script's ~10^4 job log files at once would make the next
#: script's log directories several times slower to create.
TRASH = os.environ.get("JW_BENCH_TRASH")

#: The venv's scripts live next to the interpreter running the benchmark.
BIN = Path(sys.executable).parent
TRUE = "/bin/true"
SLEEP = "/bin/sleep"
IDENTITY = "bench"


# -- results -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One row of the results table.  ``ratio`` is value / baseline; ``target`` reads like
    ``<= 2.5`` or ``>= 0.4`` and applies to the ratio (or to the value when there is no
    baseline, as for a latency in ms)."""

    figure: str
    value: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    target: str | None = None
    note: str = ""
    ratio: float | None = None
    met: bool | None = None
    #: The target applies to the value even though a baseline is shown (an absolute
    #: bound, such as an RSS in MB, beside the same figure for a reference case).
    target_on_value: bool = False

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.baseline_value:
            self.ratio = self.value / self.baseline_value
        if self.target and self.met is None:
            on_ratio = self.baseline_value and not self.target_on_value
            subject = self.ratio if on_ratio else self.value
            if subject is not None:
                op, bound = self.target.split()
                self.met = subject <= float(bound) if op == "<=" else subject >= float(bound)


@dataclass
class Result:
    script: str
    how: str
    figures: list[Figure] = field(default_factory=list)
    #: Raw material for the plot (distributions, per-client-count rates).
    series: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        say(f"  {format_figure(figure)}")
        return figure

    def to_json(self) -> dict[str, Any]:
        return {"script": self.script, "how": self.how,
                "figures": [asdict(f) for f in self.figures],
                "series": self.series, "notes": self.notes}


def format_figure(f: Figure) -> str:
    value = "-" if f.value is None else f"{f.value:.4g} {f.unit}"
    text = f"{f.figure}: {value}"
    if f.baseline_value is not None:
        text += f"  (baseline {f.baseline}: {f.baseline_value:.4g} {f.unit}"
        text += f", ratio {f.ratio:.3g})" if f.ratio is not None else ")"
    if f.target:
        subject = "ratio " if f.baseline_value is not None and not f.target_on_value else ""
        text += (f"  target {subject}{f.target}: "
                 f"{'met' if f.met else 'MISSED' if f.met is False else '?'}")
    if f.note:
        text += f"  [{f.note}]"
    return text


def how(doc: str | None) -> str:
    """A script's docstring after its title paragraph, on one line: the "how" of RESULTS.md."""
    paragraphs = (doc or "").strip().split("\n\n")[1:]
    return " ".join(" ".join(p.split()) for p in paragraphs)


def say(text: str) -> None:
    print(text, flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def cli(description: str,
        more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every benchmark script takes, and any ``more`` adds; SIGTERM becomes
    SystemExit, so a script stopped by run_all still stops its daemon (the reactor, while
    running, handles SIGTERM itself by stopping)."""
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts and sizes: a smoke run, not a measurement")
    parser.add_argument("--json", metavar="PATH", help="also write the result here as JSON")
    if more is not None:
        more(parser)
    return parser.parse_args()


def finish(result: Result, json_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result.to_json(), indent=1))


# -- statistics --------------------------------------------------------------------------------


def percentile(samples: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("no samples")
    s = sorted(samples)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def quantiles(samples: Sequence[float], points: int = 101) -> list[float]:
    """``points`` evenly spaced percentiles (0..100): a compact distribution for the plot."""
    s = sorted(samples)
    return [percentile(s, 100.0 * i / (points - 1)) for i in range(points)]


def median(values: Iterable[float]) -> float:
    return percentile(list(values), 50)


# -- bare baselines (no reactor, no daemon) ---------------------------------------------------


def bare_spawn_wait(program: str, count: int, logs: LogDirs | None = None) -> list[float]:
    """Seconds for each of ``count`` blocking ``os.posix_spawn`` + ``waitpid`` of ``program``
    (stdio on /dev/null, empty environment; with ``logs``, stdout and stderr in a new log
    directory made first, inside the timing)."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def one() -> None:
        if logs is None:
            out = err = -1
            actions = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)]
        else:
            out, err = logs.make()
            actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out, 1),
                       (os.POSIX_SPAWN_DUP2, err, 2)]
        try:
            pid = os.posix_spawn(program, [program], {}, file_actions=actions)
        finally:
            if logs is not None:
                os.close(out)
                os.close(err)
        os.waitpid(pid, 0)

    try:
        for _ in range(20):  # warm the page cache and the allocator
            one()
        samples = []
        for _ in range(count):
            began = time.perf_counter()
            one()
            samples.append(time.perf_counter() - began)
        return samples
    finally:
        os.close(null)


class LogDirs:
    """What jobworker's file system work per job amounts to, without the daemon: a new
    directory holding two new files that become the child's stdout and stderr, made by
    jobworker's own LogStore (so the root is marked to spread directories exactly when the
    daemon's would be)."""

    def __init__(self, root: Path) -> None:
        from jobworker.jobs.logs import LogStore

        self.root = root
        self.count = 0
        self.store = LogStore(str(root))
        self.store.prepare()

    def make(self) -> tuple[int, int]:
        self.count += 1
        return self.store.create_at(str(self.root / str(self.count)))


def bare_spawn_rate(program: str, seconds: float, logs: LogDirs | None = None) -> float:
    """Processes started per second by an ``os.posix_spawn`` loop, reaping as it goes;
    with ``logs``, each child first gets a log directory of its own for stdout/stderr.

    Reaps only its own children, oldest first (``waitpid(pid, WNOHANG)``), so it never
    steals the exit status of the daemon, which is also our child.
    """
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    actions = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)]
    pending: deque[int] = deque()

    def spawn() -> int:
        if logs is None:
            return os.posix_spawn(program, [program], {}, file_actions=actions)
        out, err = logs.make()
        try:
            return os.posix_spawn(program, [program], {}, file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, err, 2)])
        finally:
            os.close(out)
            os.close(err)

    def reap(block: bool) -> None:
        while pending:
            pid, _ = os.waitpid(pending[0], 0 if block else os.WNOHANG)
            if pid == 0:
                return
            pending.popleft()

    # A reactor in this process would run its SIGCHLD handler for every exit: not ours.
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for _ in range(20):
            pending.append(spawn())
        reap(True)
        count = 0
        began = time.perf_counter()
        deadline = began + seconds
        while time.perf_counter() < deadline:
            pending.append(spawn())
            count += 1
            reap(False)
        elapsed = time.perf_counter() - began
        reap(True)
        return count / elapsed
    finally:
        reap(True)
        os.close(null)
        signal.signal(signal.SIGCHLD, previous)


# -- the daemon ---------------------------------------------------------------------------------


class Bench:
    """A temp dir with a PKI and a state dir, and a real daemon listening on 127.0.0.1.

    Use as a context manager: on exit the daemon is stopped, leftover jobs this benchmark
    started are killed by pid, and the temp dir (job logs included) is deleted.
    """

    def __init__(self, name: str, daemon_args: Sequence[str] = (),
                 stop_timeout: float = 60.0, daemon_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.daemon_args = list(daemon_args)
        #: Extra environment for the daemon only (e.g. malloc tunables in an experiment).
        self.daemon_env = dict(daemon_env or {})
        self.stop_timeout = stop_timeout
        self.tmp = Path(tempfile.mkdtemp(prefix=f"jw-bench-{name}-", dir="/tmp"))
        self.pki_dir = self.tmp / "pki"
        self.state_dir = self.tmp / "state"
        self.log_path = self.tmp / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        #: pids of long-running jobs, swept with SIGKILL (by group) if still alive at exit.
        self.job_pids: set[int] = set()

    # context manager
    def __enter__(self) -> Self:
        try:
            self._make_pki()
            self.start_daemon()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_as_root(self) -> list[str]:
        """A root daemon runs each identity's jobs as a uid of its own, which cannot reach
        this checkout's venv or the bench's temp files: the benchmarks measure the daemon,
        so map the bench identity to root (as an operator's policy may), like the tests."""
        if os.geteuid() != 0 or "--policy" in self.daemon_args or \
                importlib.util.find_spec("jobworker.daemon.runas") is None:
            return []
        policy = self.tmp / "policy.toml"
        policy.write_text(f'[run_as]\n{IDENTITY} = "root"\n')
        return ["--policy", str(policy)]

    def _make_pki(self) -> None:
        self.pki_dir.mkdir()
        ca_key, ca_cert = pki.make_ca()
        pki.write_key(self.pki_dir / "ca.key", ca_key)
        pki.write_cert(self.pki_dir / "ca.pem", ca_cert)
        key, cert = pki.make_server_cert(ca_key, ca_cert, ["127.0.0.1"])
        pki.write_key(self.pki_dir / "server.key", key)
        pki.write_cert(self.pki_dir / "server.pem", cert)
        key, cert = pki.make_client_cert(ca_key, ca_cert, IDENTITY, role="user")
        pki.write_key(self.pki_dir / f"{IDENTITY}.key", key)
        pki.write_cert(self.pki_dir / f"{IDENTITY}.pem", cert)

    def start_daemon(self, timeout: float = 30.0) -> None:
        cmd = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "jobworker",
               "--pki", str(self.pki_dir), "--state-dir", str(self.state_dir),
               "--listen", "tcp:0:interface=127.0.0.1", *self.daemon_args,
               *self._run_as_root()]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=str(self.tmp), env={**os.environ, **self.daemon_env})
        record_pid(self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            m = re.search(r"jobworker\.listening host=\S+ port=(\d+)", self.log())
            if m:
                self.port = int(m.group(1))
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not listening after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.02)  # outside any reactor: a plain poll of the log file

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> Any:
        from jobworker.client.api import ClientConfig

        return ClientConfig(self.address, str(self.pki_dir / "ca.pem"),
                            str(self.pki_dir / f"{IDENTITY}.pem"),
                            str(self.pki_dir / f"{IDENTITY}.key"))

    def jwclient_argv(self, *args: str) -> list[str]:
        return [str(BIN / "jwclient"), "--server", self.address, "--pki", str(self.pki_dir),
                "--identity", IDENTITY, *args]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss(self) -> int:
        """The daemon's resident set size in bytes (VmRSS)."""
        return rss_of(self.pid)

    def stop_daemon(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            say(f"  ({self.name}: daemon ignored SIGTERM for {self.stop_timeout:g}s: "
                "SIGKILL to its process group)")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def sweep_jobs(self) -> None:
        """SIGKILL the groups of long-running jobs we started that are still alive."""
        for pid in sorted(self.job_pids):
            if _is_session_leader(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.job_pids.clear()

    def close(self) -> None:
        try:
            self.stop_daemon()
        finally:
            self.sweep_jobs()
            if TRASH and os.path.isdir(TRASH):
                os.rename(self.tmp, Path(TRASH) / self.tmp.name)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)


def record_pid(pid: int) -> None:
    """Note a session leader we started (daemon, echo server, long job) for run_all."""
    if PIDFILE:
        with open(PIDFILE, "a") as f:
            f.write(f"{pid}\n")


def sweep_pidfile(path: str | os.PathLike[str]) -> None:
    """SIGKILL the groups of recorded session leaders still alive (after a killed script)."""
    try:
        pids = {int(line) for line in Path(path).read_text().split()}
    except FileNotFoundError:
        return
    for pid in sorted(pids):
        if _is_session_leader(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_session_leader(pid: int) -> bool:
    """Alive and still the leader of its own session, as every jobworker job is
    (a pid reused by an unrelated process would almost never be)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    state, sid = fields[0], int(fields[3])
    return state != "Z" and sid == pid


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- clients on the reactor --------------------------------------------------------------------


def run_on_reactor(main: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main(reactor)`` with ``task.react`` and return its result (the reactor can
    run once per process, so each script does all its reactor work in one ``main``)."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    box: list[Any] = []

    def go(reactor: Any) -> Deferred[None]:
        d: Deferred[Any] = Deferred.fromCoroutine(main(reactor))
        d.addCallback(box.append)
        return d

    try:
        task.react(go)
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"benchmark failed (exit {e.code}); see the traceback above") from None
    finally:
        signal.signal(signal.SIGTERM, _terminate)  # the reactor replaced it
    if not box:
        raise RuntimeError("the reactor stopped before the benchmark finished")
    return box[0]


async def connect(reactor: Any, bench: Bench, count: int = 1) -> list[Any]:
    """``count`` connected, hello'd clients."""
    from jobworker.client.api import connect as _connect

    return [await _connect(reactor, bench.config()) for _ in range(count)]


async def back_to_back(clients: Sequence[Any], method: str, params: dict[str, Any],
                       seconds: float, in_flight: int = 1) -> tuple[int, float]:
    """Each client keeps ``in_flight`` calls of ``method`` going, each sent as soon as the
    previous one is answered, until ``seconds`` have passed; (replies, elapsed seconds)."""
    from twisted.internet.defer import Deferred, gatherResults

    done = [0]
    began = time.perf_counter()
    deadline = began + seconds

    async def loop(client: Any) -> None:
        while time.perf_counter() < deadline:
            await client.call(method, params)
            done[0] += 1

    await gatherResults([Deferred.fromCoroutine(loop(c)) for c in clients
                         for _ in range(in_flight)])
    return done[0], time.perf_counter() - began


def close_all(clients: Iterable[Any]) -> None:
    for c in clients:
        if c.protocol.transport is not None:
            c.protocol.transport.loseConnection()


async def start_background(reactor: Any, bench: Bench, client: Any, count: int,
                           seconds: int = 600, window: int = 100) -> list[Any]:
    """Start ``count`` ``sleep`` jobs (pipelined, ``window`` at a time) and remember their
    pids for the final sweep.  Each also has a jobworker ``timeout`` a little past its sleep,
    so nothing outlives the benchmark by long even if every cleanup failed."""
    from twisted.internet.defer import gatherResults

    from jobworker.wire.record import RUNNING, JobRecord

    records: list[Any] = []
    params = {"command": SLEEP, "args": [str(seconds)], "timeout": float(seconds + 5)}
    for i in range(0, count, window):
        n = min(window, count - i)
        batch = await gatherResults([client.call("start", params) for _ in range(n)])
        for wire in batch:
            rec = JobRecord.from_wire(wire)
            if rec.state != RUNNING or rec.pid is None:
                raise RuntimeError(f"background job did not start: {rec.error}")
            bench.job_pids.add(rec.pid)
            record_pid(rec.pid)
            records.append(rec)
    return records


async def stop_jobs(client: Any, records: Iterable[Any], window: int = 100) -> None:
    """Stop jobs through the daemon (TERM, which ends ``sleep`` at once)."""
    from twisted.internet.defer import gatherResults

    records = list(records)
    for i in range(0, len(records), window):
        await gatherResults([client.call("stop", {"job": r.id, "grace": 2.0})
                             for r in records[i:i + window]])


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform

    import twisted

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10,
                                check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "twisted": twisted.__version__,
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def elapsed_since(began: float) -> float:
    return time.perf_counter() - began


__all__ = ["Bench", "Figure", "Result", "bare_spawn_rate", "bare_spawn_wait", "cli",
           "connect", "finish", "percentile", "quantiles", "run_on_reactor", "say"]
