"""What job a reference names: a full id, a pid, a name the caller gave its job, or a
unique prefix of an id.

One function, with the steps in order, so that a new kind of reference is one more step.
"""

from __future__ import annotations

import string

from jobworker.jobs.job import Job
from jobworker.jobs.manager import JobManager
from jobworker.jobs.stored import StoredJob
from jobworker.wire.errors import BadRequest, NotFound

#: The shortest prefix of an id taken as a reference (as ``list`` shows ids when narrow).
MIN_PREFIX = 8
_ID_CHARS = frozenset(string.hexdigits + "-")


def resolve(jobs: JobManager, ref: str | int, owner: str | None,
            caller: str | None = None) -> Job | StoredJob:
    """The job ``ref`` names, looked for in this order:

    1. a full id;
    2. a pid (an int, or a string of digits): the running job with it, else the newest;
    3. a name ``caller`` gave one of its jobs (its queued or running one, else the newest);
    4. a unique prefix of ``MIN_PREFIX`` or more characters of an id, among the jobs of
       ``owner`` (None: everyone's), so neither a match nor an ambiguity tells a caller
       about jobs it may not see.

    NotFound if nothing matches; BadRequest when a prefix names several jobs.
    """
    try:
        return jobs.find(ref)
    except NotFound:
        if not isinstance(ref, str):
            raise
    if caller is not None:
        try:
            return jobs.by_name(caller, ref)
        except NotFound:
            pass
    if not is_prefix(ref):
        raise NotFound(f"no job {ref}")
    ids = jobs.ids_by_prefix(ref.lower(), owner, limit=2)
    if not ids:
        raise NotFound(f"no job {ref}")
    if len(ids) > 1:
        raise BadRequest(f"{ref} names more than one job: give more of the id")
    return jobs.get(ids[0])


def is_prefix(ref: object) -> bool:
    """Whether ``ref`` can be a prefix of an id: 8 to 35 hex digits and dashes, not all
    digits (those are pids)."""
    return (isinstance(ref, str) and MIN_PREFIX <= len(ref) < 36
            and not ref.isdecimal() and _ID_CHARS.issuperset(ref))
