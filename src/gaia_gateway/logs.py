"""Structured log lines, text or JSON, with secrets redacted on every path.

Connection lines are built from :meth:`Session.info`, which holds no token and no query string.
As a second line of defence, every record passes :class:`RedactingFilter`, which masks
``token=...`` query parameters, ``Bearer ...`` credentials, ``bearer.<JWT>`` subprotocol
entries and anything shaped like a JWT, including in exception tracebacks.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["RedactingFilter", "redact", "setup_logging"]

_PATTERNS = (
    (re.compile(r"(?i)((?:access_)?token=)[^&\s\"']+"), r"\1[REDACTED]"),
    (re.compile(r"(?i)(bearer[ .])[A-Za-z0-9._~+/=-]+"), r"\1[REDACTED]"),
    (re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "[REDACTED-JWT]"),
)


def redact(text: str) -> str:
    # Each pattern needs one of these (case-insensitively, a superset of the JWT pattern's
    # case-sensitive "eyJ"); most log fields have none, and three regex passes over every
    # field of every connection line cost more than the rest of the line.
    low = text.lower()
    if "token=" not in low and "bearer" not in low and "eyj" not in low:
        return text
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            try:
                record.msg = record.msg % record.args
            except (TypeError, ValueError):
                record.msg = f"{record.msg} {record.args!r}"
            record.args = None
        record.msg = redact(str(record.msg))
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower()} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


def _text_value(value: Any) -> str:
    text = "-" if value is None else str(value)
    return json.dumps(text) if (" " in text or not text) else text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            obj.update(fields)
        if record.exc_text:
            obj["exc"] = record.exc_text
        return json.dumps(obj, separators=(",", ":"), default=str)


def setup_logging(fmt: str = "text", level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The formatters use none of these; collecting them (a stack walk for the caller's file
    # and line, the thread and process ids) per record is the logging HOWTO's first listed
    # optimisation to skip, and an access line is written for every connection.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Third-party loggers log through the same redacting handler; asyncio's own noise about
    # peers that vanish is not ours to print at info level.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
