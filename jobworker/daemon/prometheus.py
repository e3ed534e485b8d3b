"""The daemon's metrics in Prometheus form: every name ``jobworker_``, in a registry of
the daemon's own (never the process-wide one, so tests and several daemons in one
process do not collide).  Documented name by name in docs/metrics.md.

Imported only when ``--metrics`` is given.  Counters and histograms are updated on the
reactor thread; the scrape reads them from a thread of the reactor's pool
(``prometheus_client``'s Twisted resource), which their own locks make safe.  Values
read at scrape time (connections open, audit failures) are plain ints read whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from jobworker.daemon.metrics import Metrics
from jobworker.jobs.job import Job
from jobworker.wire.record import ENDED_STATES

#: Seconds.  Most requests take well under a millisecond; start waits for its spawn,
#: stop for the job to end, wait and logs for as long as the caller asked.
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
               0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: From a job's admission to its process running: a spawn, a cgroup, a commit.
START_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0)
#: A method name from outside the dispatch table is counted under this label: clients
#: must not be able to make up label values (each is a time series kept forever).
OTHER = "other"


class PrometheusMetrics(Metrics):
    """The real ``Metrics``.  ``methods``: the dispatch table's names (one time series
    each, made up front); ``now``: the reactor's clock, which job start times use."""

    def __init__(self, methods: Iterable[str], now: Callable[[], float],
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._now = now
        r = self.registry
        self._rpc = Histogram("jobworker_rpc_duration_seconds",
                              "Time from a request's arrival to its reply, by method.",
                              ["method"], registry=r, buckets=RPC_BUCKETS)
        self._rpc_errors = Counter("jobworker_rpc_errors",
                                   "Requests answered with an error, by method and code.",
                                   ["method", "code"], registry=r)
        self._by_method = {m: self._rpc.labels(m) for m in [*methods, OTHER]}
        self._errors: dict[tuple[str, str], Counter] = {}
        self._started = Counter("jobworker_jobs_started",
                                "Jobs whose process was spawned.", registry=r)
        self._ended = Counter("jobworker_jobs_ended", "Jobs ended, by final state.",
                              ["state"], registry=r)
        self._by_state = {s: self._ended.labels(s) for s in ENDED_STATES}
        self._oom = Counter("jobworker_jobs_oom_killed",
                            "Jobs ended because the kernel killed a process of theirs "
                            "for want of memory (their cgroup's memory limit).",
                            registry=r)
        self._timed_out = Counter("jobworker_jobs_timed_out",
                                  "Jobs stopped for passing their time limit.", registry=r)
        self._running = Gauge("jobworker_jobs_running", "Jobs whose process is running.",
                              registry=r)
        self._start = Histogram("jobworker_job_start_seconds",
                                "Time from a job's admission to its process running.",
                                registry=r, buckets=START_BUCKETS)
        self._accepted = Counter("jobworker_connections_accepted",
                                 "TCP connections accepted (each then has its TLS "
                                 "handshake).", registry=r)
        self._refused = Counter("jobworker_connections_refused",
                                "Connections refused, by reason.", ["reason"], registry=r)
        self._handshakes = Counter("jobworker_tls_handshakes",
                                   "TLS handshakes ended, by outcome.", ["outcome"],
                                   registry=r)
        self._closed = Counter("jobworker_connections_closed",
                               "Authenticated connections ended, by why.", ["why"],
                               registry=r)
        self._streams = Counter("jobworker_log_streams",
                                "Log streams begun (logs requests); follow: tailing a "
                                "running job.", ["follow"], registry=r)
        self._streams_open = Gauge("jobworker_log_streams_open",
                                   "Log streams open now.", ["follow"], registry=r)
        for value in ("true", "false"):
            self._streams.labels(value)
            self._streams_open.labels(value)
        self._read = _ReadAtScrape()
        r.register(self._read)

    def watch(self, *, connections: Callable[[], int], handshaking: Callable[[], int],
              audit_failures: Callable[[], int], queued: Callable[[], int] = lambda: 0
              ) -> None:
        """Values read when scraped, from a thread: each callable must return an int it
        reads whole.  ``queued``: jobs admitted but waiting for a slot (0 until the
        daemon has a queue: hand its length here)."""
        self._read.sources = (connections, handshaking, audit_failures, queued)

    # -- Metrics --------------------------------------------------------------------

    def request_done(self, method: str, seconds: float, error: str | None) -> None:
        hist = self._by_method.get(method)
        if hist is None:
            method, hist = OTHER, self._by_method[OTHER]
        hist.observe(seconds)
        if error is not None:
            key = (method, error)
            counter = self._errors.get(key)
            if counter is None:
                counter = self._errors[key] = self._rpc_errors.labels(method, error)
            counter.inc()

    def connection_accepted(self) -> None:
        self._accepted.inc()

    def connection_refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def handshake_done(self, outcome: str) -> None:
        self._handshakes.labels(outcome).inc()

    def connection_closed(self, why: str) -> None:
        self._closed.labels(why).inc()

    def stream_opened(self, follow: bool) -> None:
        label = "true" if follow else "false"
        self._streams.labels(label).inc()
        self._streams_open.labels(label).inc()

    def stream_closed(self, follow: bool) -> None:
        self._streams_open.labels("true" if follow else "false").dec()

    def job_started(self, job: Job) -> None:
        self._started.inc()
        self._running.inc()
        self._start.observe(max(0.0, self._now() - job.started))

    def job_adopted(self, job: Job) -> None:
        self._running.inc()

    def job_ended(self, job: Job) -> None:
        counter = self._by_state.get(job.state)
        if counter is None:
            counter = self._by_state[job.state] = self._ended.labels(job.state)
        counter.inc()
        if job.pid is not None:  # it had a process (a failed start never did)
            self._running.dec()
        if job.oom_killed:
            self._oom.inc()
        if job.timed_out:
            self._timed_out.inc()


class _ReadAtScrape(Collector):
    """Gauges and a counter whose values live elsewhere, read at each scrape."""

    def __init__(self) -> None:
        zero: Callable[[], int] = lambda: 0  # noqa: E731
        self.sources: tuple[Callable[[], int], ...] = (zero, zero, zero, zero)

    def collect(self) -> Iterator[Metric]:
        connections, handshaking, audit_failures, queued = self.sources
        yield GaugeMetricFamily("jobworker_connections_open",
                                "Authenticated connections open now.", value=connections())
        yield GaugeMetricFamily("jobworker_tls_handshakes_in_progress",
                                "Connections in their TLS handshake now.",
                                value=handshaking())
        yield CounterMetricFamily("jobworker_audit_write_failures",
                                  "Audit log entries that could not be written.",
                                  value=audit_failures())
        yield GaugeMetricFamily("jobworker_jobs_queued",
                                "Jobs admitted and waiting to be started.", value=queued())
