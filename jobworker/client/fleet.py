"""Many workers at once: ``jwclient workers``, ``list --all-workers``, and finding a job
on another configured worker when the chosen one does not know it.

One thread per worker, each with its own blocking ``Client``: the TLS handshakes and
replies overlap, so asking five workers costs about what asking one does.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from jobworker.client import render
from jobworker.client.endpoint import ClientConfig, ClientError
from jobworker.client.sync import Client
from jobworker.wire.errors import JobWorkerError
from jobworker.wire.record import JobRecord

T = TypeVar("T")
#: A worker's config, or why its entry makes none.
Workers = dict[str, "ClientConfig | str"]


def each(workers: Mapping[str, ClientConfig | str], timeout: float, ask: Callable[[Client], T]
         ) -> dict[str, T | Exception]:
    """``ask`` of every worker at once, each on its own connection: its answer, or the
    exception (ClientError, JobWorkerError) that kept it from one."""
    results: dict[str, T | Exception] = {}

    def one(name: str, config: ClientConfig | str) -> None:
        if isinstance(config, str):
            results[name] = ClientError(config)
            return
        try:
            with Client(config, timeout=timeout) as client:
                results[name] = ask(client)
        except (ClientError, JobWorkerError) as e:
            results[name] = e

    threads = [threading.Thread(target=one, args=item, daemon=True) for item in workers.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {name: results[name] for name in workers}


def _why(error: Exception) -> str:
    return error.message if isinstance(error, JobWorkerError) else str(error)


def show_workers(args: argparse.Namespace, workers: Workers, current: str | None) -> int:
    """A row per worker: its server, whether it answered, and as whom it sees us."""
    answers = each(workers, args.connect_timeout, lambda c: c.whoami())
    rows: list[dict[str, Any]] = []
    for name, answer in answers.items():
        config = workers[name]
        server = config.server if isinstance(config, ClientConfig) else "-"
        if isinstance(answer, Exception):
            rows.append({"name": name, "server": server, "default": name == current,
                         "reachable": False, "error": _why(answer)})
        else:
            rows.append({"name": name, "server": server, "default": name == current,
                         "reachable": True, "identity": answer.get("identity"),
                         "role": answer.get("role")})
    if args.json:
        import json

        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table = [("WORKER", "SERVER", "REACHABLE", "IDENTITY")]
        for row in rows:
            mark = "*" if row["default"] else ""
            who = f"{row['identity']} ({row['role'] or 'no role'})" if row["reachable"] \
                else "-"
            table.append((row["name"] + mark, row["server"],
                          "yes" if row["reachable"] else f"no: {row['error']}", who))
        widths = [max(len(r[i]) for r in table) for i in range(3)]
        for r in table:
            sys.stdout.write("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)),
                                        r[3]]).rstrip() + "\n")
    return 0 if all(r["reachable"] for r in rows) else 1


def list_all(args: argparse.Namespace, workers: Workers,
             filters: dict[str, Any]) -> int:
    """``list`` of every worker at once, merged newest first, with a WORKER column."""
    def ask(client: Client) -> tuple[list[JobRecord], str | None]:
        if args.all:
            return list(client.list(running=args.running, **filters)), None
        return client.list_page(running=args.running, limit=args.limit, **filters)

    answers = each(workers, args.connect_timeout, ask)
    merged: list[tuple[str, JobRecord]] = []
    failed = False
    for name, answer in answers.items():
        if isinstance(answer, Exception):
            failed = True
            sys.stderr.write(f"jwclient: {name}: {_why(answer)}\n")
            continue
        records, more = answer
        merged.extend((name, r) for r in records)
        if more is not None:
            sys.stderr.write(f"jwclient: {name}: showing the newest {len(records)} jobs; "
                             "more exist (--limit N, or --all)\n")
    merged.sort(key=lambda item: item[1].started_at or "", reverse=True)
    if args.json:
        import json

        sys.stdout.write(json.dumps([{**r.to_wire(), "worker": name} for name, r in merged],
                                    indent=2) + "\n")
    else:
        sys.stdout.write(render.table([r for _, r in merged], time.time(), sys.stdout.isatty(),
                                      render.terminal_width(args.wide),
                                      workers=[name for name, _ in merged]))
    return 1 if failed else 0


def find_elsewhere(ref: str | int, workers: Workers, current: str | None,
                   timeout: float) -> tuple[str, ClientConfig] | None:
    """The one other worker that knows job ``ref`` (an id or prefix: a pid means
    nothing across machines), or None; several: a ClientError naming them."""
    others = {n: c for n, c in workers.items() if n != current and isinstance(c, ClientConfig)}
    if isinstance(ref, int) or not others:
        return None
    answers = each(others, timeout, lambda c: c.status(ref))
    found = [n for n, a in answers.items() if isinstance(a, JobRecord)]
    if len(found) > 1:
        raise ClientError(f"{ref} names jobs on several workers ({', '.join(found)}): "
                          "choose one with --worker")
    if not found:
        return None
    config = others[found[0]]
    assert isinstance(config, ClientConfig)
    return found[0], config

