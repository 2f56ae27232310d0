"""Logging for every daemon and command: one setup, text for people or JSON lines for shippers.

Text is the default (``ts level logger: message``). JSON puts one object on each line with ``ts``
(ISO 8601, UTC), ``level``, ``logger`` and ``msg``, plus any ``extra={...}`` fields a call site
passes (``node``, ``model``...) and ``exc`` with the traceback, so Loki or Elasticsearch can index
them without a parsing rule.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO, get_args

from swarmx.config import LogFormat, LogLevel

LEVELS: tuple[str, ...] = get_args(LogLevel)
FORMATS: tuple[str, ...] = get_args(LogFormat)
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
"""Attributes every LogRecord has: anything else on a record came from ``extra=``."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values JSON cannot hold are written as their ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str)


class _Handler(logging.Handler):
    """Writes to ``stream``, or to whatever ``sys.stderr`` is at the time (test runners swap it,
    and a handler holding a swapped-out stream would write to a closed file)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self._stream or sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the daemon down; logging reports it
            self.handleError(record)


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send the root logger's records to stderr (or ``stream``) at ``level`` in ``fmt``; calling
    it again replaces what an earlier call installed. Raises ValueError naming the flag for an
    unknown level or format."""
    if level not in LEVELS:
        raise ValueError(f"--log-level: must be {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: must be {' or '.join(FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # a library's warnings.warn (torch's at import, say) is a record too: in the chosen format,
    # not a raw line that breaks a JSON log
    logging.captureWarnings(True)
