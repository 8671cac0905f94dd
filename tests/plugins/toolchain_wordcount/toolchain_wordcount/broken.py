"""An entry point whose module cannot be imported."""

from __future__ import annotations

import toolchain_wordcount_missing_dependency  # type: ignore[import-not-found]  # noqa: F401

tools = None
