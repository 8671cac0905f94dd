"""Every README block marked `<!-- checked: tests/test_readme.py -->` works as written.

Each runs from the repository root against the interop harness's live server (real
toolchain servers on the fake backend, tests/interop/serve.py), with the server's address
in place of `127.0.0.1:50051` and the harness's TOOLCHAIN_* variables in the environment:
bash blocks with `bash -euo pipefail`, python blocks as a script file with this venv's
interpreter. A block that fails names itself by its first line.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.fakes.server_process import run_to_end
from tests.interop.serve import running

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- checked: tests/test_readme.py -->"
_BLOCK = re.compile(re.escape(MARK) + r"\n```(\w+)\n(.*?)\n```", re.S)
README_ADDRESS = "127.0.0.1:50051"


def checked_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    blocks = _BLOCK.findall(text)
    assert len(blocks) == text.count(MARK), "a checked mark not followed by a fenced block"
    return blocks


BLOCKS = checked_blocks()


@pytest_asyncio.fixture
async def live() -> AsyncIterator[dict[str, str]]:
    async with running() as (env, _servers):
        yield env


_SAME = re.compile(r"<!-- same as: (\S+) -->\n```\w+\n(.*?)\n```", re.S)


def test_the_readme_examples_are_the_example_files_that_ci_runs() -> None:
    text = (ROOT / "README.md").read_text()
    pairs = _SAME.findall(text)
    assert len(pairs) == text.count("<!-- same as: ") >= 3
    for path, code in pairs:
        assert (ROOT / path).read_text().rstrip("\n") == code, (
            f"README's copy of {path} differs from the file"
        )


def test_the_readme_has_checked_blocks_in_every_language() -> None:
    assert {lang for lang, _ in BLOCKS} >= {"bash", "python"}
    assert len(BLOCKS) >= 5


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("lang", "code"), BLOCKS, ids=[f"{i}-{c.splitlines()[0][:40]}" for i, (_, c) in enumerate(BLOCKS)]
)
async def test_readme_block_works_as_written(
    live: dict[str, str], lang: str, code: str, tmp_path: Path
) -> None:
    code = code.replace(README_ADDRESS, live["TOOLCHAIN_ADDR"])
    env = {**os.environ, **live}
    if lang == "bash":
        command = ["bash", "-euo", "pipefail", "-c", f"cd {ROOT}\n{code}"]
    elif lang == "python":
        script = tmp_path / "readme_example.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        pytest.fail(f"no runner for a checked {lang} block")
    result, out, err = await run_to_end(*command, env=env, timeout=840)
    assert result == 0, f"exit {result}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    if lang == "python":
        assert "answer: The answer is 42." in out
