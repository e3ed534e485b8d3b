"""Shared fixtures: a PKI made at run time, real ``twistd jobworker`` daemons, real jwclient."""

from __future__ import annotations

import contextlib
import datetime
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import globalLogBeginner, globalLogPublisher

from jobworker import pki

# Begin logging as twistd does, so that events are not kept in Twisted's start-up buffer
# (it would hold every event's log_source, and so objects tests expect to be freed).
globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="run the soak versions of the load tests (make soak), "
                          "which make test leaves out")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --soak, the soak versions of the load tests are deselected."""
    if config.getoption("--soak"):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def quick_and_soak(quick: Any, soak: Any, soak_timeout: float) -> pytest.MarkDecorator:
    """Parametrize a load test's ``scale``: ``quick`` in make test, ``soak`` (its counts
    scaled up, a longer timeout) in make soak."""
    return pytest.mark.parametrize("scale", [
        pytest.param(quick, id="quick"),
        pytest.param(soak, id="soak",
                     marks=[pytest.mark.soak, pytest.mark.timeout(soak_timeout)]),
    ])


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every twisted.logger event emitted in this process while the test runs."""
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = 10.0,
                what: str = "condition") -> Any:
    """``wait_for`` for tests running on the reactor: polls without blocking it."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (R, S, Z...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, it was read
        return None


def dead(pid: int) -> bool:
    """Gone or a zombie: orphans go to pid 1, which may be slow (or never) to reap them."""
    return proc_state(pid) in (None, "Z", "X")


def zombie_children(parent: int) -> list[int]:
    """Pids of ``parent``'s children that have exited but were not reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """The threads of ``pid`` (the entries of /proc/<pid>/task)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def child_pids(parent: int) -> list[int]:
    """Pids of ``parent``'s children, running or not yet reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        if int(fields[1]) == parent:
            found.append(int(entry))
    return found


def fds_but_spares(pid: int) -> int:
    """``open_fd_count`` without the descriptors on spare log files, which the spare pool
    opens and hands over as it goes (``<logs>/.spare/<group>/<n>/*.log``), nor those on
    cgroup files (the cgroup pool keeps ready cgroups' ``tasks`` open, and each running
    job's until it ends)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while we looked
        count += "/logs/.spare/" not in target and not target.startswith("/sys/fs/cgroup/")
    return count


def fds_but_cgroups(pid: int) -> int:
    """``open_fd_count`` without descriptors on cgroup files (see ``fds_but_spares``)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/sys/fs/cgroup/")
        except FileNotFoundError:
            pass
    return count


class PKI:
    """A CA, a server certificate and named client certificates in one directory."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_cert = pki.make_ca()
        pki.write_key(root / "ca.key", self.ca_key)
        pki.write_cert(root / "ca.pem", self.ca_cert)
        key, cert = pki.make_server_cert(self.ca_key, self.ca_cert, ["localhost", "127.0.0.1",
                                                                     "::1"])
        pki.write_key(root / "server.key", key)
        pki.write_cert(root / "server.pem", cert)
        self.serials: dict[str, int] = {}

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.pem")

    def client(self, name: str, role: str | None = "user", **kw: Any) -> str:
        """Issue ``name``.pem/.key (extra keywords go to ``pki.make_client_cert``)."""
        key, cert = pki.make_client_cert(self.ca_key, self.ca_cert, name, role=role, **kw)
        pki.write_key(self.dir / f"{name}.key", key)
        pki.write_cert(self.dir / f"{name}.pem", cert)
        self.serials[name] = cert.serial_number
        return name

    def paths(self, name: str) -> tuple[str, str, str]:
        return self.ca, str(self.dir / f"{name}.pem"), str(self.dir / f"{name}.key")


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    p = PKI(tmp_path_factory.mktemp("pki"))
    p.client("admin", "admin")
    p.client("alice", "user")
    p.client("bob", "user")
    p.client("auditor", "viewer")
    p.client("norole", None)
    p.client("weird", "superuser")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    p.client("expired", "user", not_after=past)
    p.client("noeku", "user", eku=None)
    p.client("servereku", "user", eku="serverAuth")
    p.client("caleaf", "user", is_ca=True)
    return p


#: Every identity the test PKI issues.
TEST_IDENTITIES = ("admin", "alice", "bob", "auditor", "norole", "weird", "expired",
                   "noeku", "servereku", "caleaf")


def cgroup_dirs(pid: int, name: str) -> list[str]:
    """The directories ``<own>/<name>`` beneath process ``pid``'s cgroup in each mounted
    hierarchy (existing or not): where that daemon keeps its job cgroups."""
    from jobworker.jobs.cgroups import detect

    found = detect(name, own=f"/proc/{pid}/cgroup")
    return list(found.driver.roots) if found.driver is not None else []


def remove_cgroup_subtree(root: str) -> list[str]:
    """rmdir the cgroups beneath ``root`` (one we made), deepest first, then ``root``;
    returns those that would not go (a process still in them)."""
    left = []
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for d in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, d))
            except OSError:
                left.append(os.path.join(dirpath, d))
    try:
        os.rmdir(root)
    except FileNotFoundError:
        pass
    except OSError:
        left.append(root)
    return left


_cgroup_names = iter(range(1 << 30))


#: Daemons started so far: one a test KILLed (never to be stopped) has its cgroup
#: subtree removed, and its jobs still there ended, when that test ends.
_started: list[Daemon] = []


@pytest.fixture(autouse=True)
def _clean_after_killed_daemons() -> Iterator[None]:
    yield
    for d in list(_started):
        if d.proc is not None and d.proc.poll() is not None:
            _started.remove(d)
            if d.proc.returncode < 0:  # killed by a signal: nothing cleaned up after it
                try:
                    d.remove_cgroups(kill_jobs=True)
                except OSError:
                    pass


class Daemon:
    """A real ``twistd -n jobworker`` in its own process group, on a free port.

    Each gets a cgroup subtree of its own (``--cgroup-root-name jwtest-<pid>-<n>``, unless
    the test names one): test daemons run side by side in the test process's cgroups."""

    def __init__(self, pki_: PKI, state_dir: Path, *args: str,
                 jobs_as_root: bool = True) -> None:
        self.pki = pki_
        self.state_dir = state_dir
        self.args = list(args)
        self.cgroup_name = f"jwtest-{os.getpid()}-{next(_cgroup_names)}"
        if not any(a.startswith("--cgroup-root-name") for a in args):
            self.args += ["--cgroup-root-name", self.cgroup_name]
        else:
            i = next(i for i, a in enumerate(self.args) if a.startswith("--cgroup-root-name"))
            self.cgroup_name = (self.args[i].split("=", 1)[1] if "=" in self.args[i]
                                else self.args[i + 1])
        if jobs_as_root and "--policy" not in self.args and os.geteuid() == 0:
            # Most tests hand jobs files under pytest's 0700 temporary directories: map
            # the test identities to root, as an operator's policy may.  Run-as itself is
            # tested with jobs_as_root=False (tests/test_runas.py).
            policy = state_dir.parent / f"{state_dir.name}-policy.toml"
            state_dir.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text("[run_as]\n" + "".join(
                f'{name} = "root"\n' for name in TEST_IDENTITIES))
            self.args += ["--policy", str(policy)]
        self.log_path = state_dir.parent / f"{state_dir.name}-twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> Daemon:
        cmd = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "jobworker",
               "--pki", str(self.pki.dir), "--state-dir", str(self.state_dir),
               "--listen", "tcp:0:interface=127.0.0.1", *self.args]
        self.log_file = open(self.log_path, "ab")
        since = self.log_file.tell()  # a restarted daemon appends: read only its lines
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=str(self.state_dir.parent))

        def listening() -> int | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"twistd exited {self.proc.returncode}:\n{self.log()}")
            m = re.search(r"jobworker\.listening host=\S+ port=(\d+)", self.log()[since:])
            return int(m.group(1)) if m else None

        self.port = wait_for(listening, timeout, what="the daemon to listen")
        self.cgroup_roots()  # now, while /proc knows the daemon: to clean up after it
        _started.append(self)
        self.cgroup_roots()  # learnt while the daemon lives, to clean up after it
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                self.remove_cgroups(kill_jobs=True)
                raise AssertionError(
                    f"daemon did not stop on SIGTERM:\n{self.log()[-3000:]}") from None
        self.log_file.close()
        self.remove_cgroups()
        return self.proc.returncode

    def cgroup_roots(self) -> list[str]:
        """This daemon's job subtree in each hierarchy (see ``cgroup_dirs``)."""
        if "--no-cgroups" in self.args or self.proc is None:
            return []
        if not hasattr(self, "_cgroup_roots"):
            self._cgroup_roots = cgroup_dirs(self.proc.pid, self.cgroup_name)
        return self._cgroup_roots

    def remove_cgroups(self, kill_jobs: bool = False) -> None:
        """After the daemon has gone: remove what it left of its own subtree (nothing, if
        it stopped cleanly), never anything else.  ``kill_jobs``: it was KILLed, so its
        jobs (in sessions of their own) may still run in there: SIGKILL them first."""
        roots = self._cgroup_roots if hasattr(self, "_cgroup_roots") else []
        if kill_jobs:
            def left() -> list[int]:
                pids = []
                for root in roots:
                    for dirpath, _, files in os.walk(root):
                        if "cgroup.procs" in files:
                            try:
                                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                                    pids += [int(p) for p in f.read().split()]
                            except OSError:
                                pass
                return pids

            def killed() -> bool:
                for pid in left():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return not left()

            try:
                wait_for(killed, 10.0, what="the KILLed daemon's jobs to go")
            except AssertionError:
                pass  # leave the rest: rmdir below refuses busy cgroups
        for root in roots:
            remove_cgroup_subtree(root)

    def config(self, identity: str = "alice"):  # type: ignore[no-untyped-def]
        from jobworker.client.api import ClientConfig

        return ClientConfig(self.address, *self.pki.paths(identity))

    def jwclient(self, *args: str, identity: str = "alice", timeout: float = 60.0,
                 check: bool = False, env: dict[str, str] | None = None,
                 input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the real ``jwclient`` command against this daemon."""
        cmd = [str(BIN / "jwclient"), "--server", self.address, "--pki", str(self.pki.dir),
               "--identity", identity, *args]
        # No input: stdin is /dev/null, as a terminal's would not be piped (jwclient run
        # warns when it is, whatever stdin pytest itself was given).
        result = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input,
                                stdin=subprocess.DEVNULL if input is None else None,
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} exited {result.returncode}: {result.stderr!r}")
        return result

    def tracebacks(self) -> list[str]:
        return [line for line in self.log().splitlines() if "Traceback" in line]


@pytest.fixture
def make_daemon(test_pki: PKI, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons with extra options; every one is stopped at the end of the test."""
    started: list[Daemon] = []

    def make(*args: str, state: str = "state") -> Daemon:
        d = Daemon(test_pki, tmp_path / f"{state}{len(started)}", *args).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def daemon(test_pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by a test module."""
    d = Daemon(test_pki, tmp_path_factory.mktemp("daemon") / "state").start()
    yield d
    d.stop()


@contextlib.contextmanager
def daemon_as_nobody(test_pki: PKI, tmp_path: Path, **kw: Any
                     ) -> Iterator[tuple[Daemon, pwd.struct_passwd]]:
    """A real ``twistd -u nobody -g nogroup jobworker`` (the standard privilege drop), its
    state directory in a folder nobody can reach (pytest's tmp dirs are 0700), stopped and
    removed after; ``kw`` goes to ``Daemon``."""
    nobody = pwd.getpwnam("nobody")
    reachable = Path(tempfile.mkdtemp(prefix="jw-nobody-"))
    reachable.chmod(0o755)
    d = Daemon(test_pki, reachable / "state", **kw)
    d.log_path = tmp_path / "twistd.log"
    log = open(d.log_path, "ab")
    proc = subprocess.Popen(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "-u", str(nobody.pw_uid), "-g",
         str(nobody.pw_gid), "jobworker", "--pki", str(test_pki.dir), "--state-dir",
         str(d.state_dir), "--listen", "tcp:0:interface=127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, cwd=str(tmp_path))
    try:
        d.port = wait_for(lambda: (m := re.search(r"listening host=\S+ port=(\d+)",
                                                  d.log())) and int(m.group(1)),
                          20, what="the daemon to listen")
        yield d, nobody
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
        shutil.rmtree(reachable, ignore_errors=True)
