"""Tool rounds: the model may call tools again after seeing results (max_rounds), repair
invalid calls (repair_invalid_calls), and be told what to do about tools (tool_choice)."""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
import pytest
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
from tests.fakes.server_process import run_to_end

EXPRESSIONS = ("1+1", "2*3", "6*7")
ANSWER = "After three rounds: 42."


def script_rounds(h: Harness, *, stream: bool, rounds: int = 3, answer: str = ANSWER) -> None:
    """`rounds` tool rounds with one calculator call each, then a text answer."""
    for i, expression in enumerate(EXPRESSIONS[:rounds]):
        args = {"expression": expression}
        if stream:
            h.fake.script(
                SSEReply(tool_call_chunks([("calculator", args)], ids=[f"c{i + 1}"], usage=(10, 2)))
            )
        else:
            h.fake.script(
                JSONReply(completion(tool_calls=[call("calculator", args, id=f"c{i + 1}")], usage=(10, 2)))
            )
    if stream:
        h.fake.script(SSEReply(text_chunks(answer, usage=(30, 5))))
    else:
        h.fake.script(JSONReply(completion(answer, usage=(30, 5))))


def tool_messages(request: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "tool"]


async def test_three_rounds_stream_three_summaries_then_the_synthesis_answer(h: Harness) -> None:
    script_rounds(h, stream=True)
    request = pb.StreamSynthesisRequest(stage=stage("What is 6*7 in three steps?", max_rounds=3))
    events, code = await collect(h.stub.StreamSynthesis(request))
    assert code == grpc.StatusCode.OK
    summaries = [e.tool_summary for e in events if e.HasField("tool_summary")]
    assert [s.round for s in summaries] == [1, 2, 3]
    assert [json.loads(s.results[0].arguments)["expression"] for s in summaries] == list(EXPRESSIONS)
    assert [s.results[0].result.struct_value["result"] for s in summaries] == [2, 6, 42]
    assert all(r.round == s.round for s in summaries for r in s.results)
    # Each round's chunks come before its summary and carry its number; synthesis is round 4.
    current = 1
    for event in events:
        if event.HasField("chunk"):
            expected = 4 if event.chunk.phase == pb.PHASE_SYNTHESIS else current
            assert event.chunk.round == expected, event
        elif event.HasField("tool_summary"):
            current = event.tool_summary.round + 1
    done = events[-1].done
    assert done.text == ANSWER and done.rounds_exhausted
    assert [r.round for r in done.tool_rounds] == [1, 2, 3]
    assert done.tool_phase.usage.prompt_tokens == 30 and done.tool_phase.round == 0
    assert done.total_usage.prompt_tokens == 60 and done.total_usage.completion_tokens == 11
    # Round n's request carried the tools and the n-1 results so far; the synthesis, no tools.
    tool_rounds, synthesis = h.fake.requests[:3], h.fake.requests[3]
    assert [len(tool_messages(r)) for r in tool_rounds] == [0, 1, 2]
    assert all(r["tools"] for r in tool_rounds) and "tools" not in synthesis
    assert len(tool_messages(synthesis)) == 3


async def test_three_rounds_unary_fold_the_same_results(h: Harness) -> None:
    script_rounds(h, stream=False)
    response = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage("steps", max_rounds=3)))
    assert response.text == ANSWER and response.rounds_exhausted
    assert [(r.round, r.outcome) for r in response.tool_results] == [
        (n, pb.TOOL_OUTCOME_OK) for n in (1, 2, 3)
    ]
    assert [r.round for r in response.tool_rounds] == [1, 2, 3]
    assert response.total_usage.total_tokens == 3 * 12 + 35


async def test_a_round_without_calls_ends_the_loop_with_its_text(h: Harness) -> None:
    script_rounds(h, stream=True)
    request = pb.StreamSynthesisRequest(stage=stage("steps", max_rounds=5))
    events, code = await collect(h.stub.StreamSynthesis(request))
    assert code == grpc.StatusCode.OK
    summaries = [e.tool_summary for e in events if e.HasField("tool_summary")]
    assert [(s.round, len(s.results)) for s in summaries] == [(1, 1), (2, 1), (3, 1), (4, 0)]
    assert not any(e.chunk.phase == pb.PHASE_SYNTHESIS for e in events if e.HasField("chunk"))
    done = events[-1].done
    assert done.text == ANSWER and not done.rounds_exhausted and not done.HasField("synthesis_phase")
    assert len(h.fake.requests) == 4 and all(r["tools"] for r in h.fake.requests)


async def test_tools_only_stage_that_runs_out_of_rounds_says_so(h: Harness) -> None:
    script_rounds(h, stream=False, rounds=2)
    response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage("steps", max_rounds=2)))
    assert [r.round for r in response.tool_results] == [1, 2]
    assert response.rounds_exhausted and response.text == ""
    assert h.fake.pending == 1  # the answer was never asked for


async def test_one_round_is_the_default_and_the_classic_stage(h: Harness) -> None:
    script_rounds(h, stream=True)
    events, code = await collect(h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage("steps"))))
    assert code == grpc.StatusCode.OK
    assert kinds(events).count("tool_summary") == 1
    assert not events[-1].done.rounds_exhausted  # one round is the classic stage, not a cut-off loop
    assert "tools" not in h.fake.requests[1]  # the second request was the synthesis


@pytest.mark.parametrize("rounds", [0, 9, -1])
async def test_max_rounds_outside_the_servers_range_is_an_invalid_field(h: Harness, rounds: int) -> None:
    events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(max_rounds=rounds))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in events[0].error.field_violations] == ["stage.max_rounds"]


BAD = {"expression": 7}  # not a string: fails the calculator's schema


async def test_repair_sends_the_validation_error_back_and_the_model_corrects_the_call(h: Harness) -> None:
    h.fake.script(JSONReply(completion(tool_calls=[call("calculator", BAD, id="bad")])))
    h.fake.script(JSONReply(completion(tool_calls=[call("calculator", {"expression": "6*7"}, id="good")])))
    h.fake.script(JSONReply(completion("42.")))
    request = pb.RunSynthesisRequest(stage=stage("6*7?", max_rounds=3, repair_invalid_calls=True))
    response = await h.stub.RunSynthesis(request)
    assert [(r.round, r.outcome) for r in response.tool_results] == [
        (1, pb.TOOL_OUTCOME_INVALID_ARGUMENTS),
        (2, pb.TOOL_OUTCOME_OK),
    ]
    (error,) = tool_messages(h.fake.requests[1])
    assert "correct it" in json.loads(error)["note"] and json.loads(error)["outcome"] == "invalid_arguments"
    assert response.text == "42."


async def test_without_repair_a_round_of_invalid_calls_ends_the_loop(h: Harness) -> None:
    h.fake.script(JSONReply(completion(tool_calls=[call("calculator", BAD, id="bad")])))
    h.fake.script(JSONReply(completion("I could not compute it.")))
    response = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage("6*7?", max_rounds=3)))
    assert [r.outcome for r in response.tool_results] == [pb.TOOL_OUTCOME_INVALID_ARGUMENTS]
    assert response.text == "I could not compute it." and response.HasField("synthesis_phase")
    assert "tools" not in h.fake.requests[1] and not response.rounds_exhausted


async def test_tool_choice_none_offers_no_tools(h: Harness) -> None:
    h.fake.script(JSONReply(completion("no tools needed")))
    choice = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)
    response = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage("hi", tool_choice=choice)))
    assert response.text == "no tools needed"
    sent = h.fake.requests[0]
    assert "tools" not in sent and "tool_choice" not in sent
    assert [m["role"] for m in sent["messages"]] == ["user"]  # nor the tools' instructions


async def test_tool_choice_required_and_named_reach_the_backend_for_the_first_round_only(h: Harness) -> None:
    h.fake.script(JSONReply(completion(tool_calls=[call("calculator", {"expression": "1+1"}, id="a")])))
    h.fake.script(JSONReply(completion("two")))
    choice = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)
    await h.stub.RunTools(pb.RunToolsRequest(stage=stage("1+1", tool_choice=choice, max_rounds=2)))
    assert [r.get("tool_choice") for r in h.fake.requests] == ["required", "auto"]

    h.fake.clear()
    h.fake.script(JSONReply(completion(tool_calls=[call("calculator", {"expression": "1+1"}, id="a")])))
    named = pb.ToolChoice(tool="calculator")
    await h.stub.RunTools(pb.RunToolsRequest(stage=stage("1+1", tool_choice=named)))
    (sent,) = h.fake.requests
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "calculator"}}
    assert [t["function"]["name"] for t in sent["tools"]] == ["calculator"]


async def test_a_named_tool_choice_outside_the_stages_tools_is_not_found(h: Harness) -> None:
    named = pb.ToolChoice(tool="get_weather")
    request = pb.RunToolsRequest(stage=stage("x", tools=["calculator"], tool_choice=named))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.RunTools(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "get_weather" in (caught.value.details() or "") and h.fake.request_count == 0


async def test_the_cli_runs_rounds_and_shows_each(h: Harness) -> None:
    script_rounds(h, stream=True)
    code, out, err = await run_to_end(
        sys.executable, "-m", "toolchain_client", "run", "--target", h.server.address, "--max-rounds", "3",
        "--tool-choice", "required", "What is 6*7 in three steps?", timeout=60,
    )  # fmt: skip
    assert code == 0, err
    assert "tool round 2" in out and "tool round 3" in out and ANSWER in out
    assert h.fake.requests[0]["tool_choice"] == "required"
    code, _, err = await run_to_end(
        sys.executable, "-m", "toolchain_client", "run", "--tool-choice", "some", "x", timeout=60
    )
    assert code == 2 and "must be auto, required, none or tool:NAME" in err


async def test_an_empty_tool_choice_is_an_invalid_field(h: Harness) -> None:
    request = pb.RunToolsRequest(stage=stage("x", tool_choice=pb.ToolChoice()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.RunTools(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage.tool_choice" in (caught.value.details() or "")


async def test_a_backend_that_cannot_force_a_choice_is_asked_with_auto(fake: FakeBackend) -> None:
    h = await start_harness(fake, backend={"forces_tool_choice": False})
    try:
        fake.script(JSONReply(completion("no call after all")))
        named = pb.ToolChoice(tool="calculator")
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage("1+1", tool_choice=named)))
        (sent,) = fake.requests
        assert sent["tool_choice"] == "auto" and [t["function"]["name"] for t in sent["tools"]] == [
            "calculator"
        ]
        assert response.text == "no call after all" and not response.tool_results  # not a failure
    finally:
        await stop_harness(h)


async def test_call_ids_stay_unique_across_rounds_when_the_model_repeats_them(h: Harness) -> None:
    for expression in ("1+1", "2*3"):
        h.fake.script(
            JSONReply(completion(tool_calls=[call("calculator", {"expression": expression}, id="same")]))
        )
    h.fake.script(JSONReply(completion("done")))
    response = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage("x", max_rounds=2)))
    assert [r.call_id for r in response.tool_results] == ["same", "call_r2_0"]
    ids = [m["tool_call_id"] for m in h.fake.requests[-1]["messages"] if m["role"] == "tool"]
    assert ids == ["same", "call_r2_0"]
