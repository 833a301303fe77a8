"""Fixtures shared by tests/ and bench/."""

from __future__ import annotations

import pytest


@pytest.fixture(params=("C", "Python"))
def relay_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the relay's hot path in C (``_speedups``), then all in Python.

    "C": ``FrameRelay(...)`` makes the C-headed relay (``feed``'s common cases and the batch
    walk in C). "Python": it makes the Python relay, with the batch walk in Python too.
    The C module is built by ``pip install`` where a C compiler exists; without one the
    gateway runs the Python relay and the C half of these tests is skipped, saying why.
    ``.ci/run`` fails when the module was not built, so CI always runs both halves.
    """
    from gaia_gateway.core import _frames

    if request.param == "C":
        if _frames._RelayHead is None:
            pytest.skip("gaia_gateway.core._speedups is not built (no C compiler at install "
                        "time?): install gcc and run pip install -e . again")
        from gaia_gateway.core._speedups import scan_small

        monkeypatch.setattr(_frames, "_Relay", _frames._CFrameRelay)
        monkeypatch.setattr(_frames, "_scan_small", scan_small)
    else:
        monkeypatch.setattr(_frames, "_Relay", _frames._PyFrameRelay)
        monkeypatch.setattr(_frames, "_scan_small", _frames._scan_small_py)
    return str(request.param)
