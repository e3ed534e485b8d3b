"""The policy file's scheduling tables: ``[queue.NAME]`` (``parallel``) and
``[quota.role.ROLE]`` / ``[quota.identity.NAME]`` (``max_running``, ``max_queued``,
``max_priority``), read into a ``QueuePolicy`` (``jobworker.jobs.scheduler``)."""

from __future__ import annotations

from typing import Any

from jobworker.jobs.scheduler import QueuePolicy, Quota
from jobworker.wire.identity import ROLES

QUOTA_KEYS = ("max_running", "max_queued", "max_priority")


class QueuePolicyError(ValueError):
    """A malformed ``[queue]`` or ``[quota]`` table; the message says where."""


def parse(path: str, queues: Any, quotas: Any) -> QueuePolicy:
    """Raise L{QueuePolicyError} naming the first problem."""
    if not isinstance(queues, dict):
        raise QueuePolicyError(f"policy {path}: [queue.NAME] tables, each with parallel = N")
    parallel: dict[str, int | None] = {}
    for name, table in queues.items():
        if not isinstance(table, dict) or set(table) - {"parallel"}:
            raise QueuePolicyError(f"policy {path}: [queue.{name}] takes only parallel = N")
        if not 1 <= len(name) <= 64:
            raise QueuePolicyError(f"policy {path}: queue name {name!r} is not 1-64 "
                                   "characters")
        value = table.get("parallel")
        if value is not None and not _count(value, 1):
            raise QueuePolicyError(f"policy {path}: [queue.{name}] parallel must be a whole "
                                   "number from 1")
        parallel[name] = value
    if not isinstance(quotas, dict) or set(quotas) - {"role", "identity"}:
        raise QueuePolicyError(f"policy {path}: [quota] holds [quota.role.ROLE] and "
                               "[quota.identity.NAME] tables")
    roles = _quotas(path, "role", quotas.get("role", {}))
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise QueuePolicyError(f"policy {path}: [quota.role] names unknown roles "
                               f"{', '.join(sorted(unknown))} (roles: {', '.join(ROLES)})")
    identities = _quotas(path, "identity", quotas.get("identity", {}))
    return QueuePolicy(parallel, roles, identities)


def _quotas(path: str, kind: str, tables: Any) -> dict[str, Quota]:
    if not isinstance(tables, dict):
        raise QueuePolicyError(f"policy {path}: [quota.{kind}.NAME] tables")
    found: dict[str, Quota] = {}
    for name, table in tables.items():
        where = f"policy {path}: [quota.{kind}.{name}]"
        if not isinstance(table, dict):
            raise QueuePolicyError(f"{where} must be a table")
        unknown = set(table) - set(QUOTA_KEYS)
        if unknown:
            raise QueuePolicyError(f"{where}: unknown keys {', '.join(sorted(unknown))} "
                                   f"(keys: {', '.join(QUOTA_KEYS)})")
        for key in ("max_running", "max_queued"):
            if key in table and not _count(table[key], 0):
                raise QueuePolicyError(f"{where}: {key} must be a whole number from 0")
        priority = table.get("max_priority", 0)
        if type(priority) is not int or not -1000 <= priority <= 1000:
            raise QueuePolicyError(f"{where}: max_priority must be a whole number from "
                                   "-1000 to 1000")
        found[name] = Quota(table.get("max_running"), table.get("max_queued"), priority)
    return found


def _count(value: Any, lowest: int) -> bool:
    return type(value) is int and lowest <= value <= 2**31
