"""Logging setup: human-readable lines for terminals, or one JSON object per line.

    configure_logging("json", "INFO")
    {"ts": "2026-01-02T03:04:05.678+00:00", "level": "INFO", "logger": "toolchain.stage",
     "message": "stage s-1 StreamSynthesis ok in 812.4 ms", "event": "stage_end", "rpc": ...}

A record may carry structured fields in `extra={FIELDS: {...}}` (the per-stage line of
`observe.py` does): JSON lines hold them as top-level fields (never a JSON string inside
a string), text lines append them as `key=value`.

Prompts and secrets never reach the logs unless `log_prompts` is set: the stage line
leaves the prompts out, and the HTTP client libraries, which log whole request bodies at
DEBUG, are held at WARNING.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

#: Attribute of a LogRecord holding its structured fields (pass as `extra={FIELDS: {...}}`).
FIELDS = "toolchain_fields"

#: Loggers that print request bodies (prompts) or headers at DEBUG.
_CHATTY = ("openai", "httpx", "httpx2", "httpcore", "hpack")
_CORE_KEYS = frozenset({"ts", "level", "logger", "message", "exc"})


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS, None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """ts (UTC, ISO 8601), level, logger, message, the record's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            if key not in _CORE_KEYS:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else json.dumps(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """`2026-01-02 03:04:05,678 INFO    toolchain.stage: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record_fields(record)
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{head} {pairs}{sep}{tail}"


def configure_logging(
    fmt: Literal["text", "json"] = "text",
    level: str | int = "INFO",
    *,
    log_prompts: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record to `stream` (stderr) in `fmt`; replaces earlier handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(
        level=level.upper() if isinstance(level, str) else level, handlers=[handler], force=True
    )
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if log_prompts else logging.WARNING)
    return handler
