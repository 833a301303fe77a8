"""Core micro-benchmarks: quick correctness runs by default, timed with ``--benchmark-only``.

Plain ``pytest bench`` runs each benchmark body once, as a test (the pytest-benchmark fixture
is disabled). ``--benchmark-only`` or ``--benchmark-enable`` times them, and a per-frame table
is printed after pytest-benchmark's own (each benchmark says in ``extra_info`` how many frames
and bytes one call relays).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The byte builders of the core tests (tests/core/wire.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))


def _timing(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_only", False)
                or config.getoption("benchmark_enable", False))


@pytest.fixture(autouse=True)
def _quick_unless_timing(request: pytest.FixtureRequest) -> None:
    if "benchmark" in request.fixturenames and not _timing(request.config):
        request.getfixturevalue("benchmark").disabled = True


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    bs = getattr(config, "_benchmarksession", None)
    rows = [b for b in (bs.benchmarks if bs else []) if b and b.extra_info.get("frames")]
    if not rows:
        return
    tr = terminalreporter
    tr.section("core relay cost per frame")
    tr.write_line(f"{'benchmark':<50} {'frames/call':>11} {'median/call':>12} "
                  f"{'median/frame':>13} {'min/frame':>10} {'MiB/s':>7}")
    for b in rows:
        med, low = b.stats.median, b.stats.min
        frames = b.extra_info["frames"]
        nbytes = b.extra_info.get("bytes", 0)
        rate = nbytes / med / 2**20 if nbytes and med else 0.0
        tr.write_line(f"{b.name:<50} {frames:>11} {_fmt(med):>12} {_fmt(med / frames):>13} "
                      f"{_fmt(low / frames):>10} {rate:>7.0f}")


def _fmt(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e3:.2f} ms"
