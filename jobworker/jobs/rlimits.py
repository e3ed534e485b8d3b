"""Process-wide resource limits the daemon sets for itself."""

from __future__ import annotations

import resource

from twisted.logger import Logger

log = Logger()


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each running job holds a pidfd);
    returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            log.warn(  # noqa: G010 (twisted.logger has no warning())
                "{event} could not raise RLIMIT_NOFILE from {soft} to {hard}",
                event="jobs.nofile_limit",
                soft=soft,
                hard=hard,
            )
    return resource.getrlimit(resource.RLIMIT_NOFILE)
