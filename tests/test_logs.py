"""The log redaction: every secret shape is masked, whatever its case; other text is untouched."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gaia_gateway.logs import redact, setup_logging

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTQyIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize(("text", "expected"), [
    (f"GET /ws/experience?token={JWT}&experience=e", "GET /ws/experience?token=[REDACTED]&experience=e"),
    ("GET /ws?TOKEN=abc&x=1", "GET /ws?TOKEN=[REDACTED]&x=1"),
    ("GET /ws?access_token=abc", "GET /ws?access_token=[REDACTED]"),
    (f"Authorization: Bearer {JWT}", "Authorization: Bearer [REDACTED]"),
    ("authorization: BEARER opaque-token", "authorization: BEARER [REDACTED]"),
    (f"Sec-WebSocket-Protocol: game.v1, bearer.{JWT}", "Sec-WebSocket-Protocol: game.v1, bearer.[REDACTED]"),
    (f"a bare {JWT} in a message", "a bare [REDACTED-JWT] in a message"),
])
def test_secrets_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "demo-user", "127.0.0.1", "1000 bye", "wylding-woods", "", "tokens=3 (not a token param)",
    "eyj lowercase is no JWT", "a Bearer-less line",
])
def test_text_without_secrets_is_returned_as_is(text: str) -> None:
    assert redact(text) is text or redact(text) == text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_connection_line_never_carries_a_token(fmt: str) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging(fmt, "info", stream=stream)
    try:
        logging.getLogger("gaia_gateway.access").info(
            "reject %s", f"/ws?token={JWT}",
            extra={"fields": {"user_id": "u", "reason": f"bearer.{JWT}", "n": 3}})
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    out = stream.getvalue()
    assert JWT not in out and "eyJ" not in out, out
    if fmt == "json":
        assert json.loads(out)["n"] == 3
