"""CI mode of the atheris harnesses: a short coverage-guided run of each must end clean.

Each harness runs as a subprocess from the committed seed corpus (read-only: new units go to
a temporary directory) for 20,000 inputs or 20 seconds, whichever comes first, with a fixed
libFuzzer seed. Exit code 0 means no input broke an invariant; anything else fails the test
with the harness's crash report (the crashing input is in the report as Base64 and in the
artifact the test prints). atheris is a hard requirement here: if it is missing this fails,
it is never skipped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"


def test_atheris_is_installed() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the point is to fail loudly
        pytest.fail(f"atheris is required for the fuzz smoke tests (pip install "
                    f"'atheris>=2.3'): {exc}")


def test_seed_corpus_is_current_and_passes() -> None:
    """fuzz/make_corpus.py --check: every committed seed exists, is current and passes."""
    proc = subprocess.run([sys.executable, str(FUZZ / "make_corpus.py"), "--check"],
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.timeout(150)
@pytest.mark.parametrize("harness, corpus", [("fuzz_http.py", "http"),
                                             ("fuzz_frames.py", "frames")])
def test_harness_short_run_is_clean(harness: str, corpus: str, tmp_path: Path) -> None:
    new_units = tmp_path / "corpus"
    new_units.mkdir()
    cmd = [
        sys.executable, str(FUZZ / harness),
        "-runs=20000", "-max_total_time=20", "-seed=1", "-print_final_stats=1",
        f"-dict={FUZZ / (corpus + '.dict')}", f"-artifact_prefix={tmp_path}/",
        str(new_units), str(FUZZ / "corpus" / corpus),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=140, cwd=tmp_path)
    report = (proc.stdout + proc.stderr)[-6000:]
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert proc.returncode == 0, f"{harness} exited {proc.returncode}; artifacts {artifacts}\n" \
                                 f"{report}"
    assert "Done " in proc.stderr or "stat::number_of_executed_units" in proc.stderr, report
