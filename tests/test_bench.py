"""The benchmark (bench/run.py) at its smoke size, on backroom's two stores: every scenario
still runs and reports. Speed is asserted by the benchmark's report, never here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
LIBS = ("backroom-redis", "backroom-sqlite")


def test_every_scenario_runs_at_smoke_size(tmp_path: Path) -> None:
    report, raw = tmp_path / "RESULTS.md", tmp_path / "runs.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--libs", ",".join(LIBS),
         "--out", str(report), "--json", str(raw)],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(raw.read_text())
    for lib in LIBS:
        [run] = data["runs"][lib]
        # scenarios 1-4, 6 (4 worker processes on one store) and 7 (no-op jobs)
        for figure in ("enqueue", "batch", "drain", "p50", "p99", "bytes", "rss", "many", "noop"):
            assert run[figure] > 0, (lib, figure, run)
        assert run["noop_jobs"] > 0
        assert run["many_drained"] > 0
        assert 1 <= run["many_ran"] <= 4  # all 4, unless the first drained the tiny backlog
        # scenario 5: backroom at two backlog sizes, in increasing order, topped up between
        points = data["scale"][lib]
        assert [p["size"] for p in points] == [1_000, 2_000]
        for point in points:
            assert point["queued"] >= point["size"] and point["finished"] >= point["size"]
            assert point["enqueue"] > 0 and point["claim"] > 0
    text = report.read_text()
    assert "drain, 4 worker processes" in text
    assert "drain, no-op jobs, 1 worker process" in text
    assert "## Scale: backroom with a growing backlog" in text
    assert "| cost 2k / 1k | target |" in text
    assert "## Failures" not in text
