"""The benchmark suite still runs end to end (``bench/run_all.py --quick``); no figure is judged."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_bench_run_writes_results_table_and_plot(tmp_path: Path) -> None:
    """A quick run of every benchmark writes results.json, RESULTS.md and (with matplotlib) plot.png."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=280, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["quick"] is True
    assert [s["script"] for s in report["scripts"] if not s["ok"]] == []
    figures = [f["figure"] for s in report["scripts"] for f in s["figures"]]
    assert "start latency p50" in figures
    assert all(f["value"] is not None for s in report["scripts"] for f in s["figures"])
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| figure | value | baseline | ratio | target |" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ab_compares_a_checkout_with_itself() -> None:
    """bench/ab.py runs two daemons from the given checkouts and prints each row with a
    paired ratio (here A/A, so only its shape is judged, never the figures)."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "ab.py"), "--a", str(ROOT),
                          "--rounds", "2", "--window", "0.2"],
                         capture_output=True, text=True, timeout=100, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [line for line in run.stdout.splitlines() if "B/A paired" in line]
    assert [row.split()[0] for row in rows] == ["requests/s", "daemon", "client"]
    for row in rows:
        assert float(row.rsplit(None, 1)[1]) > 0
