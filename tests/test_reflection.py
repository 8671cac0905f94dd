"""Server reflection, exercised with the real grpcurl binary (tests/fakes/grpcurl.py)."""

from __future__ import annotations

import json

from tests.conftest import Harness, start_harness, stop_harness
from tests.fakes.grpcurl import grpcurl
from tests.fakes.openai_backend import FakeBackend, JSONReply, call, completion

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
