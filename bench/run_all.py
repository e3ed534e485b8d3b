"""Run every benchmark against a real daemon and write results.json, RESULTS.md and plot.png.

Run: .venv/bin/python bench/run_all.py [--quick] [--out DIR] [--only NAME ...]
(``make bench`` installs the ``bench`` extra, matplotlib, and runs this.)

Each script runs in its own process (a reactor runs once per process) with a time budget;
one that overruns gets SIGTERM, so it stops its daemon, then SIGKILL, and the daemons
and jobs it had recorded are killed by pid.  The whole suite stays under 10 minutes.
The scripts' temp dirs (job logs) are deleted together at the end, not between scripts:
see harness.TRASH.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from harness import BENCH

#: (script, budget in seconds for a full run); run in this order.
SCRIPTS = [
    ("cli_wall", 60),
    ("cli_workers", 60),
    ("start_latency", 60),
    ("rpc", 60),
    ("metrics_cost", 60),
    ("throughput", 120),
    ("cgroups", 90),
    ("capture", 90),
    ("follow", 120),
    ("memory", 120),
    ("table", 180),
    ("scheduling", 180),
]
SUITE_BUDGET = 570.0  # seconds: under 10 minutes with set-up and plotting


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small counts and sizes: checks that everything runs")
    parser.add_argument("--out", default=str(BENCH), help="where results go (default: bench/)")
    parser.add_argument("--only", nargs="+", choices=[s for s, _ in SCRIPTS],
                        help="run only these scripts")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    began = time.monotonic()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="jw-bench-run-") as scratch:
        for name, budget in SCRIPTS:
            if opts.only and name not in opts.only:
                continue
            left = SUITE_BUDGET - (time.monotonic() - began)
            if left < 15:
                results.append(_failed(name, "skipped: the suite's time budget is spent"))
                continue
            results.append(run_script(name, min(budget / (3 if opts.quick else 1), left),
                                      opts.quick, Path(scratch)))
    took = time.monotonic() - began
    report = {"machine": harness.machine(), "quick": opts.quick, "seconds": round(took, 1),
              "scripts": results}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "RESULTS.md").write_text(markdown(report))
    (out / "README-section.md").write_text(readme_section(report))
    plotted = plot(report, out / "plot.png")
    print(f"\nwrote {out / 'results.json'}, {out / 'RESULTS.md'}, {out / 'README-section.md'}"
          f"{', ' + str(out / 'plot.png') if plotted else ''} in {took:.0f}s", flush=True)
    print(markdown_table(report), flush=True)
    return 0 if all(r.get("ok", True) for r in results) else 1


def run_script(name: str, budget: float, quick: bool, scratch: Path) -> dict[str, Any]:
    print(f"\n=== {name} (budget {budget:.0f}s) ===", flush=True)
    json_path = scratch / f"{name}.json"
    pidfile = scratch / f"{name}.pids"
    argv = [sys.executable, str(BENCH / f"{name}.py"), "--json", str(json_path)]
    if quick:
        argv.append("--quick")
    trash = scratch / "trash"
    trash.mkdir(exist_ok=True)
    env = {**os.environ, "JW_BENCH_PIDFILE": str(pidfile), "JW_BENCH_TRASH": str(trash)}
    began = time.monotonic()
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        code = proc.wait(budget)
    except subprocess.TimeoutExpired:
        print(f"=== {name}: over its {budget:.0f}s budget: SIGTERM", flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        harness.sweep_pidfile(pidfile)
        return _failed(name, f"over its {budget:.0f}s budget")
    harness.sweep_pidfile(pidfile)
    took = time.monotonic() - began
    if code != 0 or not json_path.exists():
        return _failed(name, f"exited {code}")
    result: dict[str, Any] = json.loads(json_path.read_text())
    result["seconds"] = round(took, 1)
    result["ok"] = True
    return result


def _failed(name: str, why: str) -> dict[str, Any]:
    print(f"=== {name}: {why}", flush=True)
    return {"script": name, "ok": False, "error": why, "figures": [], "series": {}}


# -- RESULTS.md -----------------------------------------------------------------------------


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def markdown_table(report: dict[str, Any]) -> str:
    rows = ["| figure | value | baseline | ratio | target |", "|---|---|---|---|---|"]
    for script in report["scripts"]:
        if not script.get("ok", True):
            rows.append(f"| {script['script']} | **{script['error']}** | | | |")
            continue
        for f in script["figures"]:
            baseline = (f"{_num(f['baseline_value'], f['unit'])} ({f['baseline']})"
                        if f["baseline_value"] is not None else "")
            ratio = f"{f['ratio']:.2f}" if f["ratio"] is not None else ""
            target = ""
            if f["target"]:
                on_ratio = f["baseline_value"] is not None and not f.get("target_on_value")
                what = "ratio" if on_ratio else f["unit"]
                mark = "met" if f["met"] else "**missed**"
                target = f"{what} {f['target'].replace('<=', '≤').replace('>=', '≥')}: {mark}"
            name = f["figure"].replace("  ", "&nbsp;&nbsp;")
            rows.append(f"| {name} | {_num(f['value'], f['unit'])} | {baseline} | {ratio} "
                        f"| {target} |")
    return "\n".join(rows) + "\n"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# jobworker benchmark results",
        "",
        (f"Generated by `make bench` (`bench/run_all.py{' --quick' if report['quick'] else ''}`)"
         f" in {report['seconds']:.0f} s on {m['date']}, commit `{m['commit']}`."),
        (f"Machine: {m['cores']} cores ({m['cpu']}), Linux {m['kernel']}, "
         f"Python {m['python']}, Twisted {m['twisted']}."),
        ("Every ratio is value / baseline, both measured in the same run; each script's "
         "docstring says exactly how."),
        "",
    ]
    if report["quick"]:
        lines += ["**Quick smoke run: small counts and sizes, not a measurement.**", ""]
    lines.append(markdown_table(report))
    lines += ["![start latency distribution and start throughput](plot.png)", "",
              "## How each figure is measured", ""]
    for script in report["scripts"]:
        if script.get("how"):
            lines.append(f"- **{script['script']}** ({script.get('seconds', 0):.0f} s): "
                         f"{script['how']}")
        for note in script.get("notes", []):
            lines.append(f"  - {note}")
    return "\n".join(lines) + "\n"


def readme_section(report: dict[str, Any]) -> str:
    """The README's performance section: how to measure, then the current table and plot."""
    m = report["machine"]
    missed = [f["figure"].strip() for sc in report["scripts"] for f in sc["figures"]
              if f.get("met") is False]
    return "\n".join([
        "## Performance",
        "",
        "```sh",
        "make bench                              # ~5 minutes; writes bench/results.json,",
        "                                        # bench/RESULTS.md and bench/plot.png",
        ".venv/bin/python bench/run_all.py --quick   # ~30 s smoke run of every script",
        ".venv/bin/python bench/rpc.py               # any one script alone",
        ".venv/bin/python bench/profile.py start --gil   # py-spy of the daemon under load",
        "```",
        "",
        ("Every script starts a real `twistd jobworker` on 127.0.0.1 with a throwaway PKI and "
         "real mutual TLS 1.3, prints what it measures and how, and stops by itself. Each "
         "figure is compared with a baseline measured in the same run on the same machine "
         "(a bare `posix_spawn`, a bare Twisted TLS echo, a shell redirect, `cat`), so the "
         "ratio says how close jobworker gets to what the machine allows; the absolute "
         "numbers move with the machine and its load, the ratios less so. "
         "Not part of the suite: `bench/spawn_paths.py` compares Twisted's and jobworker's "
         "spawn paths on their own, `bench/request_path.py` times the daemon's own Python "
         "per request (no TLS, no sockets), `bench/fs_topdir.py` what a job's log "
         "directory costs on the host's disk, `bench/isolate_cost.py` what `--isolate` adds "
         "to a job's start (as root; figures in "
         "[docs/jobs.md](docs/jobs.md#isolated-jobs-isolate-what-they-cost)), and "
         "`bench/ab.py` compares two checkouts "
         "with paired, alternating windows (rate and CPU per request of each daemon)."),
        "",
        (f"Measured on {m['date']} at commit `{m['commit']}`: {m['cores']} cores "
         f"({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, Twisted {m['twisted']}; "
         "details of each figure in [bench/RESULTS.md](bench/RESULTS.md)."),
        "",
        markdown_table(report).rstrip("\n"),
        "",
        "![start latency distribution and start throughput](bench/plot.png)",
        "",
        ("Targets missed in this run: " + "; ".join(missed) + "."
         if missed else "Every target was met in this run."),
        "",
    ])


# -- plot.png -----------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", flush=True)
        return False
    series: dict[str, Any] = {}
    for script in report["scripts"]:
        series.update(script.get("series", {}))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lat = series.get("start_latency_ms")
    if lat:
        pct = [i for i in range(len(lat["jobworker"]))]
        left.plot(lat["jobworker"], pct, label="jobworker start (RPC over TLS)")
        left.plot(lat["baseline"], pct, label="bare posix_spawn + waitpid", linestyle="--")
        if "baseline_logs" in lat:
            left.plot(lat["baseline_logs"], pct, linestyle=":",
                      label="bare, also making a log dir + 2 files")
        left.set_xscale("log")
        left.set_xlabel("latency (ms, log scale)")
        left.set_ylabel("percentile")
        left.set_title(f"Start latency, /bin/true ({lat['count']} samples)")
        left.grid(True, which="both", alpha=0.3)
        left.legend(loc="lower right", fontsize=8)
    tp = series.get("throughput")
    if tp:
        x = tp["clients"]
        right.plot(x, tp["idle"], marker="o", label="jobworker, no other job")
        right.plot(x, tp["busy"], marker="s", label=f"jobworker, {tp['background']} running")
        right.axhline(tp["baseline"], linestyle="--", color="gray",
                      label="bare posix_spawn loop")
        if "baseline_with_logs" in tp:
            right.axhline(tp["baseline_with_logs"], linestyle="-.", color="gray",
                          label="bare loop, also making log dirs")
        right.axhline(0.4 * tp["baseline"], linestyle=":", color="gray",
                      label="target: 0.4 x bare")
        right.set_xscale("log", base=2)
        right.set_xticks(x, [str(n) for n in x])
        right.set_ylim(bottom=0)
        right.set_xlabel("concurrent clients")
        right.set_ylabel("jobs started per second")
        right.set_title("Start throughput")
        right.grid(True, alpha=0.3)
        right.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(f"jobworker {'(quick run) ' if report['quick'] else ''}"
                 f"on {m['cores']} cores, commit {m['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
