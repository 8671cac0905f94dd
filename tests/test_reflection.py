"""Server reflection, exercised with the real grpcurl binary (tests/fakes/grpcurl.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Harness, start_harness, stop_harness
from tests.fakes.grpcurl import grpcurl
from tests.fakes.openai_backend import FakeBackend, JSONReply, call, completion
from tests.fakes.server_process import run_to_end

SERVICE = "toolchain.v1.ToolchainService"


async def test_grpcurl_lists_the_services_through_reflection(h: Harness) -> None:
    code, out, err = await grpcurl("-plaintext", h.server.address, "list")
    assert code == 0, err
    services = out.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert "grpc.reflection.v1.ServerReflection" in services


async def test_grpcurl_describes_the_toolchain_service(h: Harness) -> None:
    code, out, err = await grpcurl("-plaintext", h.server.address, "describe", SERVICE)
    assert code == 0, err
    assert f"{SERVICE} is a service:" in out
    for rpc in ("RunTools", "RunSynthesis", "StreamTools", "StreamSynthesis", "CancelStage", "ListTools"):
        assert f"rpc {rpc} (" in out
    assert "returns ( stream .toolchain.v1.StreamSynthesisResponse )" in out

    code, out, err = await grpcurl("-plaintext", h.server.address, "describe", "toolchain.v1.StageRequest")
    assert code == 0, err
    assert "string user_prompt = 3;" in out


async def test_grpcurl_calls_list_tools_through_reflection(h: Harness) -> None:
    code, out, err = await grpcurl("-plaintext", h.server.address, f"{SERVICE}/ListTools")
    assert code == 0, err
    tools = {tool["name"]: tool for tool in json.loads(out)["tools"]}
    assert {"calculator", "current_time", "get_weather", "echo"} <= set(tools)
    # Proto JSON names (lowerCamelCase): reflection serves protoc's descriptors, json_name included.
    assert tools["calculator"]["parametersSchema"]["type"] == "object"
    assert tools["calculator"]["timeout"] == "10s"


async def test_grpcurl_runs_a_stage_against_the_backend_through_reflection(h: Harness) -> None:
    h.fake.script(JSONReply(completion(tool_calls=[call("calculator", {"expression": "2+3"}, id="c1")])))
    request = {"stage": {"stage_id": "from-grpcurl", "user_prompt": "What is 2+3?", "tools": ["calculator"]}}
    code, out, err = await grpcurl(
        "-plaintext", "-d", json.dumps(request), h.server.address, f"{SERVICE}/RunTools"
    )
    assert code == 0, err
    response = json.loads(out)
    assert response["stageId"] == "from-grpcurl"
    (result,) = response["toolResults"]
    assert result["toolName"] == "calculator" and result["outcome"] == "TOOL_OUTCOME_OK"
    assert result["result"]["result"] == 5
    assert h.fake.requests[0]["tools"][0]["function"]["name"] == "calculator"


async def test_grpcurl_shows_the_error_status_of_a_failed_call(h: Harness) -> None:
    request = {"stage": {"user_prompt": ""}}
    code, _, err = await grpcurl(
        "-plaintext", "-d", json.dumps(request), h.server.address, f"{SERVICE}/RunTools"
    )
    assert code != 0
    assert "InvalidArgument" in err and "stage.user_prompt" in err


async def test_reflection_can_be_switched_off(fake: FakeBackend) -> None:
    harness = await start_harness(fake, reflection=False)
    try:
        code, _, err = await grpcurl("-plaintext", harness.server.address, "list")
        assert code != 0
        assert "does not support the reflection API" in err
    finally:
        await stop_harness(harness)


async def test_grpcurl_describe_shows_the_protos_comments(h: Harness) -> None:
    code, out, err = await grpcurl("-plaintext", h.server.address, "describe", SERVICE)
    assert code == 0, err
    assert "ToolchainService runs tool stages" in out  # the service's leading comment
    assert "CancelStage cancels a running stage, from any connection and," in out  # an RPC's
    code, out, err = await grpcurl("-plaintext", h.server.address, "describe", "toolchain.v1.ErrorReason")
    assert code == 0, err
    assert "BACKEND_RATE_LIMITED = 8;" in out and "Retry after the RetryInfo" in out


async def test_grpcurl_decodes_the_error_details_by_their_google_rpc_types(h: Harness) -> None:
    request = {"stage": {"user_prompt": "", "tool_phase": {"temperature": 3.0}}}
    code, _, err = await grpcurl(
        "-plaintext", "-format-error", "-d", json.dumps(request), h.server.address, f"{SERVICE}/RunTools"
    )
    assert code != 0
    assert "is not recognized" not in err
    status = json.loads(err)
    by_type = {d["@type"].rsplit("/", 1)[-1]: d for d in status["details"]}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "INVALID_REQUEST"
    assert by_type["google.rpc.ErrorInfo"]["metadata"] == {"phase": "PHASE_UNSPECIFIED"}
    fields = {v["field"] for v in by_type["google.rpc.BadRequest"]["fieldViolations"]}
    assert fields == {"stage.user_prompt", "stage.tool_phase.temperature"}


def _buf() -> str:
    buf = Path(__file__).resolve().parent.parent / ".ci" / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail(f"{buf} is missing: run bash .ci/setup (it installs buf)")
    return str(buf)


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_buf_curl_lists_the_methods_through_each_reflection_protocol(h: Harness, protocol: str) -> None:
    code, out, err = await run_to_end(
        _buf(),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        protocol,
        "--list-methods",
        f"http://{h.server.address}",
        timeout=30,
    )
    assert code == 0, err
    methods = set(out.split())
    for rpc in ("RunTools", "RunSynthesis", "StreamTools", "StreamSynthesis", "CancelStage", "ListTools"):
        assert f"{SERVICE}/{rpc}" in methods
