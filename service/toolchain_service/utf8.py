"""Strings that protobuf can carry.

Python strings may hold lone surrogates (a JSON text may write "\\ud800"; a tool may
build one), which UTF-8 cannot encode and protobuf refuses to serialise. Every string
that comes from outside (model output, tool results and messages) passes through
`valid` before it can reach a message: lone surrogates become U+FFFD.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def valid(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (the same object when clean)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text
