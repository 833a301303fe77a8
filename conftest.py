"""Fixtures shared by tests/ and bench/."""

from __future__ import annotations

import pytest


@pytest.fixture(params=("C", "Python"))
def scan_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the relay's batch walk in C (``_speedups``), then in Python.

    The C module is built by ``pip install`` where a C compiler exists; without one the
    gateway runs the Python walk and the C half of these tests is skipped, saying why.
    ``.ci/run`` fails when the module was not built, so CI always runs both halves.
    """
    from gaia_gateway.core import _frames

    if request.param == "C":
        try:
            from gaia_gateway.core._speedups import scan_small
        except ImportError:
            pytest.skip("gaia_gateway.core._speedups is not built (no C compiler at install "
                        "time?): install gcc and run pip install -e . again")
        monkeypatch.setattr(_frames, "_scan_small", scan_small)
    else:
        monkeypatch.setattr(_frames, "_scan_small", _frames._scan_small_py)
    return str(request.param)
