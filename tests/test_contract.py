"""The contract: its generated code is what protos/ produces (a stale copy fails here), and
the promises of its comments hold for a caller."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import Harness, collect, detail, stage
from tests.fakes.openai_backend import ErrorReply

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


# -- the contract's promises, as a caller sees them --------------------------------------


def _reasons_in_the_server() -> set[str]:
    """Every ErrorInfo reason the server's code can send: the classes' and the literals'."""
    found: set[str] = set()
    pattern = re.compile(r"""(?:\breason(?:: str)?\s*=\s*|_REASON\s*=\s*)"([A-Z][A-Z_]+)\"""")
    for path in (ROOT / "service" / "toolchain_service").rglob("*.py"):
        found.update(pattern.findall(path.read_text()))
    return found


def test_every_reason_the_server_can_send_is_an_error_reason_of_the_proto() -> None:
    from toolchain_proto.v1 import error_reason_pb2

    declared = set(error_reason_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
    sent = _reasons_in_the_server()
    assert len(sent) >= 15, sent  # the scan finds the reasons at all
    assert sent <= declared, f"reasons missing from error_reason.proto: {sorted(sent - declared)}"
    assert declared <= sent, f"reasons the server never sends: {sorted(declared - sent)}"


async def test_a_stream_rejected_before_it_starts_still_carries_a_stage_id(h: Harness) -> None:
    request = pb.StreamToolsRequest(stage=pb.StageRequest(user_prompt="", stage_id=""))
    events, code = await collect(h.stub.StreamTools(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    (event,) = events
    assert uuid.UUID(event.stage_id) and event.sequence == 0
    assert [(v.field, v.description) for v in event.error.field_violations] == [
        ("stage.user_prompt", "is required")
    ]


async def test_an_invalid_stage_id_is_not_echoed_but_replaced(h: Harness) -> None:
    request = pb.StreamToolsRequest(stage=pb.StageRequest(user_prompt="hi", stage_id="bad id\n"))
    events, code = await collect(h.stub.StreamTools(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert uuid.UUID(events[0].stage_id)
    assert [v.field for v in events[0].error.field_violations] == ["stage.stage_id"]


@pytest.mark.parametrize(
    ("reply", "delay"),
    [(ErrorReply(503), 1.0), (ErrorReply(503, headers={"Retry-After": "4"}), 4.0)],
    ids=["no-retry-after", "retry-after"],
)
async def test_a_streams_retry_delay_is_the_statuss_retry_info(
    h: Harness, reply: ErrorReply, delay: float
) -> None:
    h.fake.script(reply)
    call = h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage()))
    events, code = await collect(call)
    assert code == grpc.StatusCode.UNAVAILABLE
    error = events[-1].error
    assert error.retryable and error.retry_delay.ToNanoseconds() == delay * 1e9
    trailers = dict(await call.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = detail(status, error_details_pb2.ErrorInfo)
    retry = detail(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay == error.retry_delay
    assert info.reason == error.reason == "BACKEND_UNAVAILABLE"
    assert info.metadata["phase"] == pb.Phase.Name(error.phase) == "PHASE_TOOL"


async def test_list_tools_gives_each_timeout_as_a_duration(h: Harness) -> None:
    tools = {t.name: t for t in (await h.stub.ListTools(pb.ListToolsRequest())).tools}
    assert tools["calculator"].timeout.ToTimedelta().total_seconds() > 0


def _buf_breaking(new: Path, old: Path) -> subprocess.CompletedProcess[str]:
    buf = ROOT / ".ci" / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail(f"{buf} is missing: run bash .ci/setup (it installs buf)")
    return subprocess.run(
        [str(buf), "breaking", str(new), "--against", str(old)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_buf_breaking_fails_when_a_field_number_changes(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(ROOT / "protos", old)
    shutil.copytree(ROOT / "protos", new)
    same = _buf_breaking(new, old)
    assert same.returncode == 0, same.stdout + same.stderr  # the check passes an unchanged contract

    contract = new / "toolchain" / "v1" / "toolchain.proto"
    text = contract.read_text()
    assert text.count("string user_prompt = 3;") == 1
    contract.write_text(text.replace("string user_prompt = 3;", "string user_prompt = 30;"))
    changed = _buf_breaking(new, old)
    assert changed.returncode != 0
    assert 'Previously present field "3" with name "user_prompt" on message "StageRequest"' in changed.stdout
