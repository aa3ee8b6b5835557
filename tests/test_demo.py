"""`backroom demo` runs end to end on a fresh SQLite file and its table names every job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_drains_its_jobs_and_names_every_job_and_rejection(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "backroom", "demo", "--jobs", "120"]
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for job in ("process_logs", "send_email", "archive_stream", "send_invoices", "transcode_vod"):
        assert job in out
    for reason in ("unknown job", "source not allowed", "invalid payload"):
        assert reason in out
    assert "failed twice (ConnectionError), then succeeded on attempt 3" in out
    assert "UnknownJob" in out and "SourceNotAllowed" in out and "InvalidPayload" in out
    assert "Traceback" not in proc.stderr
