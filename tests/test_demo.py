"""``python -m splicepool.demo`` runs on its own, end to end, as a real subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import own_processes

from splicepool.xfer import HAVE_SPLICE

ROOT = Path(__file__).resolve().parent.parent
# One table row: "   3  main    client->upstream   8,388,611   123.4  EOF   0  zero-copy"
ROW = re.compile(r"^\s*(\d+)\s+(\w+)\s+(\S+->\S+)\s+([\d,]+)\s+\S+\s+(\w+)\s+(\d+)\s+(\S+)$", re.M)

pytestmark = own_processes


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splicepool.demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


def assert_passed(proc: subprocess.CompletedProcess[str], connections: int) -> list[tuple[str, ...]]:
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "ALL CHECKS PASSED" in out
    assert "FAILED" not in out
    assert "MiB moved" in out and "\r" not in out  # progress as plain lines: stdout is a pipe
    rows = ROW.findall(out)
    assert len(rows) == 2 * connections, out  # one row per splice, two splices per connection
    reasons = {row[4] for row in rows}
    assert {"EOF", "MAX", "IDLE"} <= reasons, out  # the idle and capped lanes did their part
    assert re.search(r"worker 0: .* passes .* wakeups", out)
    return rows


@pytest.mark.timeout(120)
@pytest.mark.skipif(not HAVE_SPLICE, reason="zero-copy needs os.splice (Linux)")
def test_demo_zero_copy() -> None:
    rows = assert_passed(run_demo("--size", "8"), 8)
    assert {row[6] for row in rows} == {"zero-copy"}


@pytest.mark.timeout(120)
def test_demo_copy_path() -> None:
    rows = assert_passed(run_demo("--size", "8", "--copy", "--connections", "5", "--workers", "3"), 5)
    assert {row[6] for row in rows} == {"copy"}
    assert {int(row[5]) for row in rows} == {0, 1, 2}  # round-robin over all three workers


@pytest.mark.timeout(120)
def test_demo_deadline_fails_cleanly() -> None:
    proc = run_demo("--size", "2048", "--seconds", "0.5")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "TIMEOUT" in proc.stdout
    assert "ALL CHECKS PASSED" not in proc.stdout
    assert "Traceback" not in proc.stderr
