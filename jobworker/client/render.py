"""Human output for jwclient: aligned tables with relative times and durations.

``--json`` bypasses all of this; scripts never parse these tables.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime
from typing import Any

from jobworker.wire.record import CANCELLED, FAILED, LOST, QUEUED, RUNNING, STOPPED, JobRecord


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def ago(then: float | None, now: float) -> str:
    if then is None:
        return "-"
    delta = max(0.0, now - then)
    return "just now" if delta < 1 else f"{duration(delta)} ago"


def runtime(record: JobRecord, now: float) -> str:
    """How long the job ran (so far); ``-`` for a job that never ran."""
    if record.state == FAILED or (record.pid is None and record.ended):
        return "-"
    start = parse_time(record.started_at)
    end = parse_time(record.ended_at) if record.ended_at else now
    if start is None or end is None:
        return "-"
    return duration(max(0.0, end - start))


def outcome(record: JobRecord) -> str:
    """``exited 0``, ``killed by SIGKILL``, ``stopped (SIGTERM)``, ``failed: why``,
    ``lost: why``."""
    if record.state == RUNNING:
        return "running"
    if record.state == QUEUED:
        return f"queued ({record.queue})"
    if record.state == CANCELLED:
        return f"cancelled: {record.error}" if record.error else "cancelled"
    if record.state == FAILED:
        return f"failed: {record.error}"
    if record.state == LOST:
        return f"lost: {record.error}" if record.error else "lost"
    how = (f"code {record.exit_code}" if record.exit_code is not None
           else f"{record.signal}" if record.signal else "?")
    extra = (", timed out" if record.timed_out else "") + (
        ", out of memory" if record.oom_killed else "")
    if record.state == STOPPED:
        return f"stopped ({how}{extra})"
    if record.signal:
        return f"killed by {record.signal}{extra}"
    return f"exited {record.exit_code}{extra}"


def size(n: int | None) -> str:
    """Bytes in powers of 1024: ``512 B``, ``3.4 MiB``; ``-`` when not counted."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def usage(u: dict[str, Any]) -> str:
    """``cpu 1.2s, memory peak 3.4 MiB, io read 0 B, written 8.0 KiB`` (``-``: this host
    does not count it; see docs/isolation.md for what v1 counts as written)."""
    cpu = u.get("cpu_seconds")
    cpu_text = "-" if not isinstance(cpu, int | float) else f"{cpu:.3g}s"
    return (f"cpu {cpu_text}, memory peak {size(u.get('memory_peak'))}, "
            f"io read {size(u.get('io_read_bytes'))}, written {size(u.get('io_write_bytes'))}")


def limits(lim: dict[str, Any]) -> str:
    """``memory 512.0 MiB, cpu 0.5, pids 64, io read 10.0 MiB/s, write -`` (``-``:
    unlimited)."""
    memory = lim.get("memory")
    io = [f"{size(lim[k])}/s" if lim.get(k) is not None else "-"
          for k in ("io_read", "io_write")]
    return (f"memory {size(memory) if memory is not None else '-'}, "
            f"cpu {lim.get('cpu') if lim.get('cpu') is not None else '-'}, "
            f"pids {lim.get('pids') if lim.get('pids') is not None else '-'}, "
            f"io read {io[0]}, write {io[1]}")


def command_line(record: JobRecord) -> str:
    """The job's command as a shell would need it typed: ``sh -c 'echo hi; exit 0'``."""
    return shlex.join([record.command, *record.args])


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, an ellipsis marking a cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…"


def terminal_width(wide: bool = False) -> int | None:
    """Columns to fit tables in: $COLUMNS or the terminal's; None off a terminal or with
    ``--wide`` (cells are then never cut)."""
    if wide or not os.isatty(1):
        return None
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        columns_now = os.get_terminal_size(1).columns
    except OSError:
        return None
    return columns_now or 80  # a terminal that does not say its size


def record(r: JobRecord, now: float, tty: bool) -> str:
    rows = [
        ("id", r.id),
        ("state", outcome(r)),
        ("command", command_line(r)),
        ("pid", str(r.pid) if r.pid is not None else "-"),
        ("owner", r.owner),
        ("dir", r.dir),
        ("started", f"{r.started_at} ({ago(parse_time(r.started_at), now)})"
         if r.started_at else "-"),
        ("ended", f"{r.ended_at} ({ago(parse_time(r.ended_at), now)})" if r.ended_at else "-"),
        ("runtime", runtime(r, now)),
        ("logs", r.log_dir or "-"),
    ]
    if r.queued_at is not None:
        rows.append(("queued", f"{r.queued_at} in {r.queue}, priority {r.priority}"))
    if r.timeout is not None:
        rows.append(("timeout", duration(r.timeout)))
    if r.isolate:
        rows.append(("isolate", ",".join(r.isolate)))
    if r.limits is not None:
        rows.append(("limits", limits(r.limits)))
    if r.usage is not None:
        rows.append(("usage", usage(r.usage)))
    width = max(len(k) for k, _ in rows) + 1
    return "".join(f"{k + ':':<{width}} {v}\n" for k, v in rows)


#: Least columns a cut cell keeps; the most STATE, OWNER and WORKER take once a table
#: must be narrowed; a job id's shortest unique-enough prefix (the daemon takes 8+).
_MIN_CELL = 8
_CAPS = {"STATE": 20, "OWNER": 12, "WORKER": 12}
SHORT_ID = 8


def table(records: list[JobRecord], now: float, tty: bool, width: int | None = None,
          workers: list[str] | None = None) -> str:
    """Aligned columns, newest first; within ``width`` columns when given (ids shortened
    to a prefix jwclient accepts, long STATE, OWNER and COMMAND cells cut with an
    ellipsis), whole otherwise.  ``workers``: a WORKER column, one name per record."""
    header = ["ID", "PID", "STATE", "OWNER", "STARTED", "RUNTIME", "COMMAND"]
    rows = [[r.id, str(r.pid) if r.pid is not None else "-", outcome(r), r.owner,
             ago(parse_time(r.started_at), now), runtime(r, now), command_line(r)]
            for r in records]
    if workers is not None:
        header.insert(0, "WORKER")
        rows = [[w, *row] for w, row in zip(workers, rows, strict=True)]
    if not rows:
        return "no jobs\n" if tty else ""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    if width is not None:
        widths = _fit(header, widths, width)
    short_id = header.index("ID")
    lines = []
    for row in [header, *rows]:
        cells = [f"{(cell[:widths[i]] if i == short_id else cut(cell, widths[i])):<{widths[i]}}"
                 for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, cut(row[-1], widths[-1])]).rstrip())
    return "\n".join(lines) + "\n"


def _fit(header: list[str], widths: list[int], width: int) -> list[int]:
    """Narrow columns, in this order, until a row fits ``width``: STATE, OWNER and WORKER
    to their caps, ID to a prefix, COMMAND to 20, STATE further, COMMAND further."""
    natural, widths = widths, list(widths)
    last, state, ident = len(widths) - 1, header.index("STATE"), header.index("ID")

    def over() -> int:
        return sum(widths) + 2 * (len(widths) - 1) - width

    def shrink(i: int, floor: int) -> None:
        if over() > 0:
            widths[i] = max(min(widths[i], floor), widths[i] - over())

    for i, name in enumerate(header):
        if name in _CAPS:
            shrink(i, max(len(name), _CAPS[name]))
    if over() > 0:  # an id is whole or a prefix that still names it, never cut between
        widths[ident] = SHORT_ID
    shrink(last, 20)
    shrink(state, _MIN_CELL)
    shrink(last, _MIN_CELL)
    for i in (state, last, *range(len(widths))):  # room left: give cut cells some back
        if over() < 0 and widths[i] < natural[i] and i != ident:
            widths[i] = min(natural[i], widths[i] - over())
    return widths


def queues(result: dict[str, Any]) -> str:
    """``jwclient queue``: one line per queue, then the daemon's totals."""
    rows = [("QUEUE", "RUNNING", "QUEUED", "PARALLEL")]
    for q in result["queues"]:
        rows.append((q["queue"], str(q["running"]), str(q["queued"]),
                     str(q["parallel"]) if q["parallel"] is not None else "unlimited"))
    limit = result.get("max_running")
    rows.append(("(all)", str(result["running"]), str(result["queued"]),
                 str(limit) if limit is not None else "unlimited"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "".join("  ".join([*(f"{c:<{w}}" for c, w in zip(row[:3], widths, strict=True)),
                              row[3]]) + "\n" for row in rows)
