"""Which job a caller may act on, and the audit line of every refusal: the glue between
the handlers, the authorizer and the audit trail."""

from __future__ import annotations

from typing import Any

from jobworker.daemon import jobref
from jobworker.daemon.audit import AuditLog
from jobworker.daemon.authz import Authorizer
from jobworker.daemon.call import Call
from jobworker.jobs.job import Job
from jobworker.jobs.manager import JobManager
from jobworker.jobs.stored import StoredJob
from jobworker.wire.errors import Forbidden, JobWorkerError, NotFound


class JobAccess:
    """Finds the jobs a caller may see, and records refusals in the audit log."""

    def __init__(self, jobs: JobManager, authz: Authorizer, audit: AuditLog | None) -> None:
        self.jobs = jobs
        self.authz = authz
        self.audit = audit

    def visible_job(self, call: Call, ref: str | int) -> Job | StoredJob:
        """The job ``ref`` names (an id, a pid, a name of the caller's, then a unique id
        prefix: ``jobref``), if the caller may act on it; else the same NotFound."""
        owner = None if self.authz.sees_all(call.who) else call.who.name
        try:
            job = jobref.resolve(self.jobs, ref, owner, call.who.name)
        except NotFound:
            raise NotFound(f"no job {ref}") from None
        if self.authz.can_see(call.who, job.owner):  # dispatch has checked the method
            return job
        try:
            self.authz.check_job(call.who, call.method, job.owner, ref)
        except (NotFound, Forbidden) as e:
            if call.method in ("stop", "forget"):  # the methods that change something
                self.audit_refusal(call, e, {"job": ref})
            raise
        return job

    def audit_refusal(self, call: Call, error: JobWorkerError, params: dict[str, Any]) -> None:
        if self.audit is not None:
            job = params.get("job")
            self.audit.record(identity=call.who.name, role=call.who.role, method=call.method,
                              job_id=str(job) if job is not None else None,
                              outcome=f"refused:{error.code}", reason=error.message)
