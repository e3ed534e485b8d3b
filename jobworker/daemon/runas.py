"""Whom each identity's jobs run as, when the daemon is root: the policy's ``[run_as]`` and
``[allowed_users]``, else a dynamic uid of the identity's own.

No job runs as root unless the policy maps an identity to ``root`` (or lets it ask for it).
An identity with no mapping gets an unprivileged uid (and a gid of the same number) from
``--dynamic-uids``, kept in ``<state-dir>/dynamic-uids.json`` so it is stable across
restarts and never shared: identities then cannot signal or read each other's processes
and files.  When the daemon is not root, every job runs as the daemon's user.
"""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Callable

from twisted.logger import Logger

from jobworker.daemon.authz import Policy
from jobworker.jobs.credentials import Credentials
from jobworker.wire.errors import BadRequest, Forbidden, Unavailable

DEFAULT_RANGE = (61184, 65519)  # systemd's DynamicUser= range


def parse_range(text: str) -> tuple[int, int]:
    """``61184-65519``; ValueError with the reason otherwise."""
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise ValueError(f"bad uid range {text!r}: use FIRST-LAST, e.g. 61184-65519") from None
    if not sep or not 1000 <= lo <= hi < 2**31 - 1:
        raise ValueError(f"bad uid range {text!r}: FIRST-LAST, from 1000 up")
    return lo, hi


class DynamicUids:
    """The dynamic uid of each identity that has one, persisted in ``path``."""

    log = Logger()

    def __init__(self, path: str, first: int, last: int,
                 taken: Callable[[int], bool] | None = None) -> None:
        self.path = path
        self.first = first
        self.last = last
        self._taken = taken or _in_passwd
        self._uids: dict[str, int] = {}

    def load(self) -> None:
        """Read the file (at start-up); a missing file is an empty table."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in data.items()):
            raise ValueError(f"{self.path}: not a map of identity to uid")
        self._uids = dict(data)

    def uid_of(self, identity: str) -> int:
        """The identity's uid, allocating (and persisting) one on first use."""
        uid = self._uids.get(identity)
        if uid is not None:
            return uid
        used = set(self._uids.values())
        for candidate in range(self.first, self.last + 1):
            if candidate not in used and not self._taken(candidate):
                break
        else:
            raise Unavailable(f"no dynamic uid left in {self.first}-{self.last} "
                              "(--dynamic-uids)")
        self._uids[identity] = candidate
        self._save()  # a few hundred microseconds, once per identity for good
        self.log.info("{event} identity={identity} uid={uid}", event="runas.dynamic_uid",
                      identity=identity, uid=candidate)
        return candidate

    def _save(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._uids, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _in_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


#: Seconds a user's entry (uid, gid, groups, home) is reused: looking a user up costs
#: ~0.2 ms (getpwnam, then getgrouplist reads the whole group database), which a batch of
#: 10,000 starts would pay 10,000 times.  Changes to passwd/group apply within this time.
NAMED_FOR = 5.0


class RunAs:
    """Resolves an identity (and the user it asks for) to the credentials of its job,
    by the policy in force (``policy()``: a SIGHUP reload applies to the next start)."""

    def __init__(self, policy: Callable[[], Policy], dynamic: DynamicUids | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self.dynamic = dynamic  # None: the daemon is not root, jobs run as it
        self._clock = clock
        self._named: dict[str, tuple[float, Credentials]] = {}  # user -> (until, its entry)

    def _user(self, user: str) -> Credentials:
        now = self._clock()
        cached = self._named.get(user)
        if cached is not None and cached[0] > now:
            return cached[1]
        creds = _named(user)
        if len(self._named) > 1024:  # bounded: users come from the policy, but still
            self._named.clear()
        self._named[user] = (now + NAMED_FOR, creds)
        return creds

    def credentials(self, identity: str, user: str | None) -> Credentials | None:
        """The job's credentials; None when jobs run as the daemon's own user.  Raises
        L{Forbidden} for a user the identity may not ask for."""
        if self.dynamic is None:
            if user is not None:
                raise BadRequest("this daemon is not root: jobs run as its own user, "
                                 "so --user cannot be honoured")
            return None
        policy = self._policy()
        mapped = policy.run_as.get(identity)
        if user is not None:
            if user != mapped and user not in policy.allowed_users.get(identity, []):
                raise Forbidden(f"identity {identity!r} may not run jobs as {user!r} "
                                "(policy [run_as] / [allowed_users])")
            return self._user(user)
        if mapped is not None:
            return self._user(mapped)
        uid = self.dynamic.uid_of(identity)
        return Credentials(uid, uid, (), f"jw-{identity}", "/")


def _named(user: str) -> Credentials:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise BadRequest(f"no such user on this host: {user!r}") from None
    groups = tuple(g for g in os.getgrouplist(user, entry.pw_gid) if g != entry.pw_gid)
    return Credentials(entry.pw_uid, entry.pw_gid, groups, entry.pw_name, entry.pw_dir)
