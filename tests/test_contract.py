"""The contract's generated code is what protos/ produces; a stale copy fails here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_generated_package_does_not_collide_with_a_generic_toolchain_package() -> None:
    from toolchain_proto.v1 import toolchain_pb2, toolchain_pb2_grpc

    assert toolchain_pb2.DESCRIPTOR.package == "toolchain.v1"
    assert "toolchain_proto.v1" in toolchain_pb2_grpc.__name__
    # Nothing is installed under the generic top-level name protoc would have used.
    assert importlib.util.find_spec("toolchain") is None
