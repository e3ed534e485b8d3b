"""Who may do what: the one place that answers "may identity X with role R do M to job J".

Roles come from the client certificate's OU unless the policy file overrides them.
A job of another identity is reported exactly like a missing one, so a ``user``
learns nothing about jobs it may not see.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from jobworker.daemon.queuepolicy import QueuePolicyError, parse
from jobworker.jobs.scheduler import QueuePolicy
from jobworker.wire.errors import Forbidden, NotFound
from jobworker.wire.identity import ROLES, PeerIdentity

#: Methods anyone authenticated (and not denied) may call.
PUBLIC = frozenset({"hello", "whoami"})
#: Methods that act on one existing job.
JOB_METHODS = frozenset({"status", "stop", "logs", "wait", "forget"})

_ALLOWED: dict[str, frozenset[str]] = {
    "admin": frozenset({"start", "start_many", "stop", "status", "list", "logs", "wait",
                        "forget", "queues"}),
    "user": frozenset({"start", "start_many", "stop", "status", "list", "logs", "wait",
                       "forget", "queues"}),
    "viewer": frozenset({"status", "list", "logs", "wait", "queues"}),
}
#: Roles that see every job; the others see only their own.
_SEE_ALL = frozenset({"admin", "viewer"})


class PolicyError(Exception):
    """The policy file is unreadable or malformed."""


@dataclass(frozen=True)
class Policy:
    """Overrides from ``--policy``: identity → role, identities denied outright, whom
    identities' jobs run as (``jobworker.daemon.runas``), and the queues and quotas of
    the scheduler (``jobworker.daemon.queuepolicy``)."""

    roles: dict[str, str] = field(default_factory=dict)
    deny: frozenset[str] = frozenset()
    run_as: dict[str, str] = field(default_factory=dict)
    allowed_users: dict[str, list[str]] = field(default_factory=dict)
    queues: QueuePolicy = field(default_factory=QueuePolicy)

    @classmethod
    def load(cls, path: str) -> Policy:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise PolicyError(f"cannot read policy {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"policy {path} is not valid TOML: {e}") from None
        unknown = set(data) - {"roles", "deny", "run_as", "allowed_users", "queue", "quota"}
        if unknown:
            raise PolicyError(f"policy {path}: unknown keys {', '.join(sorted(unknown))}")
        roles = data.get("roles", {})
        if not isinstance(roles, dict) or not all(
            isinstance(k, str) and v in ROLES for k, v in roles.items()
        ):
            raise PolicyError(f"policy {path}: [roles] maps identities to one of {', '.join(ROLES)}")
        deny = data.get("deny", [])
        if not isinstance(deny, list) or not all(isinstance(x, str) for x in deny):
            raise PolicyError(f"policy {path}: deny is a list of identities")
        run_as = data.get("run_as", {})
        if not isinstance(run_as, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in run_as.items()):
            raise PolicyError(f"policy {path}: [run_as] maps identities to Unix user names")
        allowed = data.get("allowed_users", {})
        if not isinstance(allowed, dict) or not all(
                isinstance(k, str) and isinstance(v, list)
                and all(isinstance(u, str) and u for u in v) for k, v in allowed.items()):
            raise PolicyError(f"policy {path}: [allowed_users] maps identities to lists of "
                              "Unix user names")
        try:
            queues = parse(path, data.get("queue", {}), data.get("quota", {}))
        except QueuePolicyError as e:
            raise PolicyError(str(e)) from None
        return cls(roles=dict(roles), deny=frozenset(deny), run_as=dict(run_as),
                   allowed_users={k: list(v) for k, v in allowed.items()}, queues=queues)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller with the role the policy gives it (None: no usable role)."""

    name: str
    role: str | None
    denied: bool = False


class Authorizer:
    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()

    def principal(self, peer: PeerIdentity) -> Principal:
        if peer.name in self.policy.deny:
            return Principal(peer.name, None, denied=True)
        role = self.policy.roles.get(peer.name, peer.role)
        return Principal(peer.name, role if role in ROLES else None)

    def check_method(self, who: Principal, method: str) -> None:
        """Raise L{Forbidden} unless ``who`` may call ``method`` at all."""
        if method in _ALLOWED.get(who.role or "", PUBLIC) and not who.denied:
            return  # every request asks: the common answer first
        if who.denied and method != "hello":
            raise Forbidden(f"identity {who.name!r} is denied by policy")
        if method in PUBLIC:
            return
        if who.role is None:
            raise Forbidden(f"identity {who.name!r} has no role; it may only call whoami")
        if method not in _ALLOWED.get(who.role, frozenset()):
            raise Forbidden(f"role {who.role!r} may not call {method}")

    def sees_all(self, who: Principal) -> bool:
        """Whether ``who`` sees every identity's jobs (else only its own)."""
        return who.role in _SEE_ALL

    def can_see(self, who: Principal, owner: str) -> bool:
        return who.role in _SEE_ALL or (who.role == "user" and owner == who.name)

    def check_job(self, who: Principal, method: str, owner: str, ref: object) -> None:
        """Raise unless ``who`` may call ``method`` on a job owned by ``owner``.

        A job the caller may not see is L{NotFound}, never L{Forbidden}, so its
        existence does not leak.
        """
        self.check_method(who, method)
        if not self.can_see(who, owner):
            raise NotFound(f"no job {ref}")
