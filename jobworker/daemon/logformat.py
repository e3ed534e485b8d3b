"""``--log-format json``: the daemon's log as one JSON object per line (for journald,
Loki and the like), handed to twistd in place of its text observer.

Each line holds ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``event`` (the
formatted message, as the text log shows it), ``name`` (the stable event name, such as
``job.started``, when the event has one), ``namespace`` (the logger), ``traceback`` for
failures, and the event's own fields.  A field whose value JSON cannot hold is written as
its ``str``.  twisted.logger's own ``eventAsJSON`` is made to round-trip events, not to
be read by people or log stores, hence this small one.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import signal
import sys
from typing import IO, Any

from twisted.application import service
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent
from twisted.python.logfile import LogFile

#: What a line always has: an event field of the same name is written with ``_`` after.
RESERVED = frozenset({"time", "level", "event", "name", "namespace", "traceback"})
#: The legacy log system's keys (events from twisted.python.log) that ``event`` and
#: ``traceback`` already say (``system`` is kept: the text log shows it too).
LEGACY = frozenset({"message", "isError", "format", "why", "failure", "time"})
#: ``jobs.limits``, ``connection.closed``: a format that starts with one is its name.
_NAME = re.compile(r"[a-z_]+(?:\.[a-z_]+)+(?=\s|$)")
#: How deep lists and dicts in a field are followed before the rest is a str.
_DEPTH = 4


def event_as_json(event: LogEvent) -> str:
    """One line of JSON (newline included) for ``event``."""
    line: dict[str, Any] = {
        "time": _time(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", None),
        "event": formatEvent(event),
    }
    own = event.get("event")
    if isinstance(own, str):
        line["name"] = own
    else:
        found = _NAME.match(event.get("log_format") or "")
        if found:
            line["name"] = found.group(0)
    line["namespace"] = event.get("log_namespace")
    failure = event.get("log_failure")
    if failure is not None:
        try:
            line["traceback"] = failure.getTraceback()
        except Exception:  # noqa: BLE001 (a broken failure must not lose the line)
            line["traceback"] = repr(failure)
    legacy = "log_legacy" in event or event.get("log_namespace") == "log_legacy"
    for key, value in event.items():
        if key.startswith("log_") or key == "event" or (legacy and key in LEGACY):
            continue
        line[f"{key}_" if key in RESERVED else key] = _safe(value, _DEPTH)
    return json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n"


def _time(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)):
        return None
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe(value: Any, depth: int) -> Any:
    """``value`` as JSON can hold it: itself, or its ``str``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > 0 and isinstance(value, (list, tuple, set, frozenset)):
        return [_safe(v, depth - 1) for v in value]
    if depth > 0 and isinstance(value, dict):
        return {str(k): _safe(v, depth - 1) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode(errors="backslashreplace")
    try:
        return str(value)
    except Exception:  # noqa: BLE001 (a field that cannot be shown must not lose the line)
        return object.__repr__(value)


def json_observer(out: IO[str]) -> FileLogObserver:
    """An observer writing each event to ``out`` as one JSON line."""
    return FileLogObserver(out, event_as_json)


def twistd_destination(twistd: Any) -> IO[str] | None:
    """Where twistd itself would log given its options (``--logfile``, ``-n``), opened
    the way it opens it (a ``LogFile`` rotated at 1 MB and on SIGUSR1); None when it
    logs to syslog (which has a format of its own)."""
    options = twistd if twistd is not None else {}
    if options.get("syslog"):
        return None
    name = options.get("logfile") or ""
    if name == "-" or (not name and options.get("nodaemon")):
        return sys.stdout
    log_file = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):  # as twistd: unless someone handles it

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor  # the running one, by now

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file  # type: ignore[return-value]


class ServiceTree(service.MultiService):
    """The daemon's top service.  Made a child of twistd's application (after
    ``makeService``, before twistd starts logging), it sets ``observer`` as the
    application's log observer, which twistd then uses instead of its text one (unless
    twistd's own ``--logger`` names another)."""

    def __init__(self, observer: ILogObserver | None = None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> Any:
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)
