"""The llama-server that .ci/setup built runs on any x86-64 CPU with AVX2 (or any arm64).

On a CPU that advertises AMX (or AVX-512) that its OS or hypervisor does not enable, a
build with `-march=native` compiles those instructions in and faults on the first one:
that is how both README commands once died with SIGSEGV on a 2-core Xeon VM. This machine
may not be such a CPU, so the test looks at the binary itself: objdump finds no AMX tile
instruction and no AVX-512 register in it (.ci/check-isa), and a real generation runs."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from toolchain_service.backends.local_model import find_server_binary

ROOT = Path(__file__).resolve().parents[1]


def _run_script(name: str, target: Path) -> subprocess.CompletedProcess[str]:
    """One of the .ci checks on `target`, run to its end."""
    command = [sys.executable, str(ROOT / ".ci" / name), str(target)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)


def _binary() -> Path:
    binary = find_server_binary()
    assert binary is not None, "llama-server is not built: run bash .ci/setup"
    return binary


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets only")
def test_the_built_llama_server_holds_no_amx_or_avx512_instructions() -> None:
    result = _run_script("check-isa", _binary())
    assert result.returncode == 0, result.stderr
    assert "no AMX and no AVX-512 instructions" in result.stdout


def test_check_isa_finds_amx_and_avx512_where_they_are(tmp_path: Path) -> None:
    """The check itself can fail: an object file with ldtilecfg and a zmm instruction."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("assembles x86-64 code")
    source = tmp_path / "bad.s"
    source.write_text(".text\n.globl f\nf:\n  ldtilecfg (%rdi)\n  vpaddd %zmm0, %zmm1, %zmm2\n  ret\n")
    obj = tmp_path / "bad.o"
    subprocess.run(["cc", "-c", str(source), "-o", str(obj)], check=True, timeout=60)
    result = _run_script("check-isa", obj)
    assert result.returncode == 1
    assert "1 AMX instructions" in result.stderr and "1 AVX-512 instructions" in result.stderr


@pytest.mark.model
def test_the_smoke_check_generates_text_with_the_built_binary() -> None:
    result = _run_script("smoke-model", _binary())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("smoke-model: ok:")
