"""contrib/systemd/jobworker.service: its ExecStart line run for real with a fake
$NOTIFY_SOCKET, its ExecReload, systemd-analyze verify; and the notifier on fakes."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, PKI, ROOT, cgroup_dirs, remove_cgroup_subtree, wait_for
from test_robustness import Conn
from twisted.internet.testing import MemoryReactorClock

from jobworker.daemon.sdnotify import Notifier, Readiness

UNIT = ROOT / "contrib" / "systemd" / "jobworker.service"
POLICY = ROOT / "examples" / "policy.toml"


def unit_settings(path: Path = UNIT) -> dict[str, str]:
    """``Key=value`` of the unit file, continuation lines joined (last one wins)."""
    settings: dict[str, str] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def exec_start(state: Path, pki_dir: Path, policy: Path) -> list[str]:
    """The unit's ExecStart, with this machine's twistd, the test's PKI, state and policy,
    and a free port on 127.0.0.1 in place of the installed paths and 0.0.0.0:8443."""
    line = unit_settings()["ExecStart"]
    for old, new in (("/opt/jobworker/bin/twistd", str(BIN / "twistd")),
                     ("/etc/jobworker/pki", str(pki_dir)),
                     ("/var/lib/jobworker", str(state)),
                     ("/etc/jobworker/policy.toml", str(policy)),
                     ("tcp:8443:interface=0.0.0.0", "tcp:0:interface=127.0.0.1")):
        assert old in line, f"ExecStart no longer holds {old}: {line}"
        line = line.replace(old, new)
    return shlex.split(line)


class FakeSystemd:
    """A datagram socket in the abstract namespace, as systemd's $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.name = f"@jwtest-notify-{os.getpid()}-{id(self)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])

    def receive(self, timeout: float) -> dict[str, str]:
        """The next message's fields; a deadline, not a sleep."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd() -> Iterator[FakeSystemd]:
    s = FakeSystemd()
    yield s
    s.close()


def test_exec_start_notifies_ready_once_listening_and_stopping_on_sigterm(
        test_pki: PKI, tmp_path: Path, fake_systemd: FakeSystemd) -> None:
    """The unit's ExecStart, with $NOTIFY_SOCKET set, sends READY=1 and the address once
    the port answers; ExecReload's SIGHUP reloads; SIGTERM sends STOPPING=1 and ends it."""
    policy = tmp_path / "policy.toml"
    shutil.copy(POLICY, policy)  # the shipped example, as the README installs it
    argv = exec_start(tmp_path / "state", test_pki.dir, policy)
    cgroup_name = f"jwtest-systemd-{os.getpid()}"
    argv += ["--cgroup-root-name", cgroup_name]
    log = tmp_path / "twistd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JWCLIENT_")}
    env["NOTIFY_SOCKET"] = fake_systemd.name
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, cwd=tmp_path,
                                start_new_session=True)
    try:
        ready = fake_systemd.receive(timeout=30)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid), ready
        assert ready["STATUS"].startswith("listening on 127.0.0.1:"), ready
        port = int(ready["STATUS"].rsplit(":", 1)[1])
        conn = Conn(types.SimpleNamespace(pki=test_pki, port=port))  # type: ignore[arg-type]
        conn.hello()
        assert conn.call("whoami")["identity"] == "alice"
        conn.close()
        assert not (tmp_path / "twistd.pid").exists()  # --pidfile= in the unit

        reload = unit_settings()["ExecReload"].replace("$MAINPID", str(proc.pid))
        subprocess.run(shlex.split(reload), check=True, timeout=10)
        wait_for(lambda: "reload.policy path=" in log.read_text(), 10,
                 what="the daemon to re-read its policy on ExecReload")

        proc.send_signal(signal.SIGTERM)
        stopping = fake_systemd.receive(timeout=30)
        assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("stopping")
        # twistd ends by re-raising SIGTERM, which systemd counts as a clean stop.
        assert proc.wait(30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:  # failed: KILL it, and remove the cgroups it leaves
            cgroups = cgroup_dirs(proc.pid, cgroup_name)  # while /proc knows it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            for root in cgroups:
                remove_cgroup_subtree(root)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say about the unit (its twistd path
    pointed at this machine's, which verify requires to exist)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    copy = tmp_path / "jobworker.service"
    copy.write_text(UNIT.read_text().replace("/opt/jobworker/bin/twistd", str(BIN / "twistd")))
    result = subprocess.run([analyze, "verify", "--man=no", "--recursive-errors=no", str(copy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result


# -- the notifier, on fakes -------------------------------------------------------------------


def test_notifier_sends_one_datagram_to_a_path_socket(tmp_path: Path) -> None:
    """A $NOTIFY_SOCKET path gets the lines as one datagram."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        assert Notifier.from_environ({"NOTIFY_SOCKET": path}).send("READY=1", "STATUS=up")
        s.settimeout(5)
        assert s.recv(4096) == b"READY=1\nSTATUS=up"


def test_notifier_without_or_with_a_dead_socket_does_nothing(tmp_path: Path) -> None:
    """No $NOTIFY_SOCKET: nothing sent; a socket nobody listens on: False, no exception."""
    assert not Notifier.from_environ({}).enabled
    assert Notifier.from_environ({}).send("READY=1") is False
    assert Notifier(str(tmp_path / "nobody")).send("READY=1") is False
    assert Notifier("vsock:2:1").enabled is False


def test_readiness_waits_for_the_reactor_and_says_stopping(fake_systemd: FakeSystemd) -> None:
    """READY=1 is sent when the reactor runs, not when the service starts; STOPPING=1 at
    stopService."""
    reactor = MemoryReactorClock()
    readiness = Readiness(reactor, Notifier(fake_systemd.name), "listening on 127.0.0.1:1")
    readiness.startService()
    fake_systemd.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        fake_systemd.sock.recv(4096)  # nothing yet: the reactor has not run
    reactor.run()
    assert fake_systemd.receive(5)["STATUS"] == "listening on 127.0.0.1:1"
    readiness.stopService()
    assert fake_systemd.receive(5)["STOPPING"] == "1"
