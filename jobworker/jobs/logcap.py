"""``--max-log-bytes``: a running job whose stdout and stderr together pass the cap is
stopped, and its record says why; what it wrote stays."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from jobworker.jobs.job import Job
from jobworker.jobs.logs import JobLogs

#: Seconds between looks: two stat() calls per running job each time (~3 us each).
INTERVAL = 1.0


def log_bytes(job: Job) -> int:
    """Bytes in ``job``'s two log files now (none while it is being started)."""
    if job.log_dir is None:
        return 0
    logs = JobLogs(job.log_dir)
    total = 0
    for stream in ("stdout", "stderr"):
        try:
            total += os.stat(logs.path(stream)).st_size
        except OSError:
            pass
    return total


class LogCap(service.Service):
    """Every ``interval`` seconds, stops running jobs whose logs passed ``cap`` bytes."""

    log = Logger()

    def __init__(self, reactor: Any, running: Callable[[], list[Job]],
                 stop: Callable[[Job], Any], cap: int, interval: float = INTERVAL,
                 measure: Callable[[Job], int] = log_bytes) -> None:
        self._running = running
        self._stop = stop
        self.cap = cap
        self._measure = measure
        self._loop = LoopingCall(self.look)
        self._loop.clock = reactor
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def look(self) -> None:
        for job in self._running():
            if job.error is not None or job.ended:
                continue
            size = self._measure(job)
            if size > self.cap:
                job.error = (f"its logs passed --max-log-bytes ({self.cap} bytes): "
                             "stopped; what it wrote was kept")
                self.log.warn(  # noqa: G010
                    "{event} job={job_id} bytes={size} cap={cap}", event="job.log_cap",
                    job_id=job.id, size=size, cap=self.cap)
                self._stop(job)
