"""Namespaces per job, the daemon's side: the helper command an isolated job is spawned
as (``jobworker.jobs.nsinit``), and whether this host can isolate jobs at all."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from jobworker.jobs import nsinit
from jobworker.jobs.credentials import Credentials
from jobworker.jobs.nsinit import ENV_PREFIX, NAMESPACES, effective
from jobworker.wire.errors import BadRequest

__all__ = ["NAMESPACES", "NamespaceSupport", "effective", "helper_command", "probe_host"]

#: How the helper is run: isolated from the environment (-I), and without ``site`` (-S),
#: which saves most of Python's start-up (the .pth files of every installed package): it
#: is run as a file, and needs nothing but the standard library.
HELPER = ["-I", "-S", os.path.abspath(nsinit.__file__)]

#: Why a daemon that is not root refuses isolation.
NOT_ROOT = ("this daemon is not root (or gave root up, twistd -u): it cannot make "
            "namespaces, so --isolate cannot be honoured")


def helper_command(namespaces: Sequence[str], executable: str, argv: Sequence[str],
                   env: Mapping[str, str], creds: Credentials | None,
                   python: str | None = None) -> tuple[str, list[str], dict[str, str]]:
    """What to spawn (as root, with no credentials taken) instead of ``executable``: the
    helper's executable, its arguments and its environment, which carries the job's
    environment under other names.  The helper takes ``creds`` itself once the
    namespaces are made."""
    python = python or sys.executable
    args = [python, *HELPER, "--ns", ",".join(effective(namespaces))]
    if creds is not None:
        args += ["--uid", str(creds.uid), "--gid", str(creds.gid),
                 "--groups", ",".join(map(str, creds.groups))]
    args += ["--", executable, *argv]
    helper_env = {f"{ENV_PREFIX}{i}": f"{k}={v}" for i, (k, v) in enumerate(env.items())}
    return python, args, helper_env


def probe_host(python: str | None = None, timeout: float = 10.0) -> str | None:
    """Run the helper's probe (every namespace made and set up, in a throwaway process):
    None if it works, else why not.  Blocks: call it from a thread."""
    python = python or sys.executable
    if not python:
        return "the daemon does not know its Python interpreter (sys.executable)"
    try:
        done = subprocess.run([python, *HELPER, "--probe"],
                              env={}, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, cwd="/", check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the namespace helper did not run: {e}"
    if done.returncode == 0:
        return None
    said = done.stderr.decode(errors="replace").strip().splitlines()
    return said[-1] if said else f"the namespace helper exited {done.returncode}"


class NamespaceSupport:
    """Whether jobs can be isolated here: never by a daemon that is not root; otherwise
    the helper's probe says, run once on first use, in a thread."""

    log = Logger()

    def __init__(self, reactor: Any, root: bool,
                 probe: Callable[[], str | None] = probe_host) -> None:
        self._reactor = reactor
        self._probe = probe
        self._known = not root
        self._why_not: str | None = None if root else NOT_ROOT
        self._waiting: list[Deferred[None]] = []

    def ready(self) -> Deferred[None] | None:
        """None if jobs can be isolated; raises L{BadRequest} saying why if they cannot;
        a Deferred (of its own for each caller) while the first probe runs."""
        if self._known:
            if self._why_not is not None:
                raise BadRequest(f"cannot isolate jobs: {self._why_not}")
            return None
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            pool = self._reactor.getThreadPool()
            deferToThreadPool(self._reactor, pool, self._probe).addBoth(self._probed)
        return d

    def _probed(self, result: str | None | Failure) -> None:
        if isinstance(result, Failure):
            self.log.failure("{event}", result, event="namespaces.probe_failed")
            result = "the namespace probe failed (see the daemon's log)"
        self._known = True
        self._why_not = result
        self.log.info("{event} available={available} reason={reason}",
                      event="namespaces.probed", available=result is None, reason=result)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if result is None:
                d.callback(None)
            else:
                d.errback(BadRequest(f"cannot isolate jobs: {result}"))
