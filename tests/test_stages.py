"""A stage end to end: generated stubs → real grpc.aio server → real HTTP fake backend."""

from __future__ import annotations

import json

import grpc
from google.protobuf import json_format
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import Harness, collect, kinds, stage, start_harness, stop_harness
from tests.fakes.openai_backend import (
    FakeBackend,
    JSONReply,
    SSEReply,
    call,
    completion,
    text_chunks,
    tool_call_chunks,
)


def script_calculator_stage(h: Harness, *, streamed: bool, answer: str = "The answer is 5.") -> None:
    if streamed:
        h.fake.script(
            SSEReply(tool_call_chunks([("calculator", {"expression": "2+3"})], split=3, usage=(40, 12))),
            SSEReply(text_chunks(answer, usage=(60, 6))),
        )
    else:
        h.fake.script(
            JSONReply(
                completion(tool_calls=[call("calculator", {"expression": "2+3"}, id="c1")], usage=(40, 12))
            ),
            JSONReply(completion(content=answer, usage=(60, 6))),
        )


async def test_stream_synthesis_yields_both_phases_summary_and_done_with_usage(h: Harness) -> None:
    script_calculator_stage(h, streamed=True)
    call_ = h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage(stage_id="s-1")))
    events, code = await collect(call_)

    assert code == grpc.StatusCode.OK
    assert [e.sequence for e in events] == list(range(len(events)))
    assert all(e.stage_id == "s-1" for e in events)
    order = kinds(events)
    assert order.count("tool_summary") == 1 and order[-1] == "done"
    summary_at = order.index("tool_summary")
    assert all(e.chunk.phase == pb.PHASE_TOOL for e in events[:summary_at])
    synthesis = [e.chunk for e in events[summary_at + 1 : -1]]
    assert synthesis and all(c.phase == pb.PHASE_SYNTHESIS for c in synthesis)
    assert "".join(c.content for c in synthesis) == "The answer is 5."

    # The tool-call deltas reach the caller with id and name once and the arguments in pieces.
    deltas = [d for e in events[:summary_at] for d in e.chunk.tool_calls]
    assert [d.name for d in deltas if d.name] == ["calculator"]
    assert json.loads("".join(d.arguments_fragment for d in deltas)) == {"expression": "2+3"}

    (result,) = events[summary_at].tool_summary.results
    assert result.tool_name == "calculator" and result.outcome == pb.TOOL_OUTCOME_OK
    assert json_format.MessageToDict(result.result)["result"] == 5

    done = events[-1].done
    assert done.text == "The answer is 5."
    assert done.tool_phase.finish_reason == "tool_calls"
    assert done.tool_phase.usage.completion_tokens == 12
    assert done.synthesis_phase.usage.prompt_tokens == 60
    assert done.synthesis_phase.finish_reason == "stop"

    # Phase 2 got the assistant tool call and one tool message with the result.
    second = h.fake.requests[1]
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == "calculator"
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool" and json.loads(tool_message["content"])["result"] == 5
    assert "tools" not in second


async def test_unary_synthesis_returns_the_same_text_and_results_as_the_stream(h: Harness) -> None:
    script_calculator_stage(h, streamed=True)
    events, _ = await collect(h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage())))
    script_calculator_stage(h, streamed=False)
    response = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage(stage_id="u-1")))

    assert response.stage_id == "u-1"
    assert response.text == events[-1].done.text
    streamed_results = next(e.tool_summary.results for e in events if e.HasField("tool_summary"))
    assert [(r.tool_name, r.outcome, r.result) for r in response.tool_results] == [
        (r.tool_name, r.outcome, r.result) for r in streamed_results
    ]
    assert response.tool_phase.usage.total_tokens == 52
    assert response.synthesis_phase.usage.total_tokens == 66
    assert h.fake.requests[2]["stream"] is False


async def test_stream_tools_ends_after_the_summary_without_synthesis(h: Harness) -> None:
    h.fake.script(SSEReply(tool_call_chunks([("echo", {"text": "hi"})])))
    events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage())))
    assert code == grpc.StatusCode.OK
    assert kinds(events)[-2:] == ["tool_summary", "done"]
    assert not events[-1].done.HasField("synthesis_phase")
    assert h.echo.calls == ["hi"]
    assert h.fake.request_count == 1


async def test_run_tools_returns_results_and_the_server_generates_a_stage_id(h: Harness) -> None:
    h.fake.script(
        JSONReply(completion(tool_calls=[call("echo", {"text": "a"}), call("echo", {"text": "b"})]))
    )
    response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()))
    assert len(response.stage_id) == 36  # a UUID
    assert [r.outcome for r in response.tool_results] == [pb.TOOL_OUTCOME_OK, pb.TOOL_OUTCOME_OK]
    assert sorted(h.echo.calls) == ["a", "b"]
    assert not response.tool_phase.HasField("usage")  # this backend reported none


async def test_no_tool_call_is_not_a_failure_and_skips_synthesis(h: Harness) -> None:
    h.fake.script(SSEReply(text_chunks("Paris is the capital of France.")))
    events, code = await collect(h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage("Capital?"))))
    assert code == grpc.StatusCode.OK
    assert kinds(events)[-2:] == ["tool_summary", "done"]
    assert list(events[-2].tool_summary.results) == []
    assert events[-1].done.text == "Paris is the capital of France."
    assert not events[-1].done.HasField("synthesis_phase")
    assert h.fake.request_count == 1

    h.fake.script(JSONReply(completion(content="Just text.")))
    response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage("Hi")))
    assert list(response.tool_results) == [] and response.text == "Just text."


async def test_system_prompt_gets_the_tool_instructions_and_specs_are_sent(h: Harness) -> None:
    h.fake.script(JSONReply(completion(content="no tools")))
    await h.stub.RunTools(pb.RunToolsRequest(stage=stage(system_prompt="Be brief.", tools=["calculator"])))
    body = h.fake.requests[0]
    system = body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.")
    assert "calculator" in system["content"] and "echo" not in system["content"]
    assert [t["function"]["name"] for t in body["tools"]] == ["calculator"]
    assert body["tool_choice"] == "auto"
    assert body["max_tokens"] == 256 and body["temperature"] == 0.0


async def test_per_phase_max_tokens_and_temperature_reach_the_backend(h: Harness) -> None:
    script_calculator_stage(h, streamed=False)
    await h.stub.RunSynthesis(
        pb.RunSynthesisRequest(
            stage=stage(
                tool_phase=pb.PhaseOptions(max_tokens=33, temperature=0.1),
                synthesis_phase=pb.PhaseOptions(max_tokens=77, temperature=1.5),
            )
        )
    )
    first, second = h.fake.requests
    assert (first["max_tokens"], first["temperature"]) == (33, 0.1)
    assert (second["max_tokens"], second["temperature"]) == (77, 1.5)


async def test_list_tools_gives_names_and_json_schemas(h: Harness) -> None:
    response = await h.stub.ListTools(pb.ListToolsRequest())
    tools = {t.name: t for t in response.tools}
    assert {"calculator", "current_time", "get_weather", "echo"} <= set(tools)
    schema = json_format.MessageToDict(tools["calculator"].parameters_schema)
    assert schema["type"] == "object" and "expression" in schema["properties"]
    assert tools["misbehave"].timeout.ToNanoseconds() == 500_000_000


async def test_backend_option_sends_tool_results_as_user_messages(fake: FakeBackend) -> None:
    harness = await start_harness(fake, backend={"tool_results_as_user": True})
    try:
        script_calculator_stage(harness, streamed=False)
        await harness.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()))
        last = fake.requests[1]["messages"][-1]
        assert last["role"] == "user" and '"result":5' in last["content"].replace(" ", "")
        assert fake.requests[1]["messages"][-2]["content"] == ""  # the assistant turn, never null
    finally:
        await stop_harness(harness)
