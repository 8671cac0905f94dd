"""Every tool-call shape a backend or model produces is executed, in unary and streaming
alike; invalid and unknown calls are reported in the summary and nothing runs for them."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from toolchain_proto.v1 import toolchain_pb2 as pb

from tests.conftest import Harness, collect, stage, start_harness, stop_harness
from tests.fakes.openai_backend import (
    FakeBackend,
    JSONReply,
    Reply,
    SSEReply,
    call,
    completion,
    text_chunks,
    tool_call_chunks,
)

MODES = ["unary", "stream"]


async def run_tools(
    h: Harness, mode: str, reply_unary: Reply, reply_stream: Reply
) -> list[pb.ToolCallResult]:
    """Run a tools-only stage with the reply that fits the mode; return the results."""
    if mode == "unary":
        h.fake.script(reply_unary)
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()))
        return list(response.tool_results)
    h.fake.script(reply_stream)
    events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage())))
    assert code == grpc.StatusCode.OK
    (summary,) = [e.tool_summary for e in events if e.HasField("tool_summary")]
    return list(summary.results)


def content_reply(text: str) -> tuple[Reply, Reply]:
    return JSONReply(completion(content=text)), SSEReply(text_chunks(text, pieces=7))


def outcomes(results: list[pb.ToolCallResult]) -> list[tuple[str, int]]:
    return [(r.tool_name, r.outcome) for r in results]


@pytest.mark.parametrize("mode", MODES)
async def test_native_tool_call_is_executed(h: Harness, mode: str) -> None:
    results = await run_tools(
        h,
        mode,
        JSONReply(completion(tool_calls=[call("echo", {"text": "native"})])),
        SSEReply(tool_call_chunks([("echo", {"text": "native"})], split=5)),
    )
    assert outcomes(results) == [("echo", pb.TOOL_OUTCOME_OK)]
    assert h.echo.calls == ["native"]


@pytest.mark.parametrize("mode", MODES)
async def test_several_calls_at_once_run_and_keep_the_model_order(h: Harness, mode: str) -> None:
    calls: list[tuple[str, Any]] = [
        ("echo", {"text": "one"}),
        ("calculator", {"expression": "6*7"}),
        ("echo", {"text": "two"}),
    ]
    results = await run_tools(
        h,
        mode,
        JSONReply(completion(tool_calls=[call(n, a) for n, a in calls])),
        SSEReply(tool_call_chunks(calls, split=2)),
    )
    assert [r.tool_name for r in results] == ["echo", "calculator", "echo"]
    assert all(r.outcome == pb.TOOL_OUTCOME_OK for r in results)
    assert results[1].result.struct_value["result"] == 42
    assert sorted(h.echo.calls) == ["one", "two"]
    assert len({r.call_id for r in results}) == 3


async def test_streamed_deltas_repeating_id_and_name_assemble_one_call(h: Harness) -> None:
    h.fake.script(
        SSEReply(tool_call_chunks([("echo", {"text": "llama style"})], split=6, repeat_id_and_name=True))
    )
    events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage())))
    assert code == grpc.StatusCode.OK
    deltas = [d for e in events if e.HasField("chunk") for d in e.chunk.tool_calls]
    assert [d.name for d in deltas if d.name] == ["echo"]  # not "echoechoecho..."
    assert len([d for d in deltas if d.id]) == 1
    assert h.echo.calls == ["llama style"]


@pytest.mark.parametrize("mode", MODES)
async def test_json_object_in_content_is_a_tool_call(h: Harness, mode: str) -> None:
    results = await run_tools(h, mode, *content_reply('{"name": "echo", "arguments": {"text": "qwen"}}'))
    assert outcomes(results) == [("echo", pb.TOOL_OUTCOME_OK)]
    assert h.echo.calls == ["qwen"]


@pytest.mark.parametrize("mode", MODES)
async def test_json_list_in_content_is_several_tool_calls(h: Harness, mode: str) -> None:
    text = json.dumps(
        [{"name": "echo", "arguments": {"text": "x"}}, {"name": "echo", "parameters": {"text": "y"}}]
    )
    results = await run_tools(h, mode, *content_reply(f"```json\n{text}\n```"))
    assert outcomes(results) == [("echo", pb.TOOL_OUTCOME_OK)] * 2
    assert sorted(h.echo.calls) == ["x", "y"]


@pytest.mark.parametrize("mode", MODES)
async def test_hermes_tool_call_blocks_in_content_are_tool_calls(h: Harness, mode: str) -> None:
    text = (
        "I will use tools.\n<tool_call>\n"
        '{"name": "echo", "arguments": {"text": "h1"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    )
    results = await run_tools(h, mode, *content_reply(text))
    assert outcomes(results) == [("echo", pb.TOOL_OUTCOME_OK), ("calculator", pb.TOOL_OUTCOME_OK)]
    assert h.echo.calls == ["h1"]


@pytest.mark.parametrize("mode", MODES)
async def test_plain_json_answer_is_the_answer_not_a_tool_call(h: Harness, mode: str) -> None:
    answer = '{"name": "Paris", "country": "France"}'
    unary, streamed = content_reply(answer)
    if mode == "unary":
        h.fake.script(unary)
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()))
        assert (list(response.tool_results), response.text) == ([], answer)
        return
    h.fake.script(streamed)
    events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage())))
    assert code == grpc.StatusCode.OK
    assert [list(e.tool_summary.results) for e in events if e.HasField("tool_summary")] == [[]]
    assert events[-1].done.text == answer


async def test_backend_with_the_native_parser_reads_no_call_from_the_content(fake: FakeBackend) -> None:
    h = await start_harness(fake, backend={"tool_parser": "native"})
    try:
        text = '{"name": "echo", "arguments": {"text": "not a call here"}}'
        h.fake.script(JSONReply(completion(content=text)))
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()))
        assert (list(response.tool_results), response.text) == ([], text)
        assert h.echo.calls == []
    finally:
        await stop_harness(h)


@pytest.mark.parametrize("mode", MODES)
async def test_unknown_tool_is_reported_and_nothing_runs(h: Harness, mode: str) -> None:
    results = await run_tools(
        h,
        mode,
        JSONReply(completion(tool_calls=[call("launch_rockets", {"n": 1}), call("echo", {"text": "ok"})])),
        SSEReply(tool_call_chunks([("launch_rockets", {"n": 1}), ("echo", {"text": "ok"})])),
    )
    assert outcomes(results) == [
        ("launch_rockets", pb.TOOL_OUTCOME_UNKNOWN_TOOL),
        ("echo", pb.TOOL_OUTCOME_OK),
    ]
    assert "calculator" in results[0].error  # names what is available
    assert h.echo.calls == ["ok"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("arguments", "expected_error"),
    [
        ('{"text": ', "not valid JSON"),
        ('["text"]', "JSON object"),
        ('{"text": 5}', "schema"),
        ('{"text": "a", "extra": 1}', "schema"),
        ("{}", "schema"),
    ],
)
async def test_invalid_arguments_are_reported_and_never_executed(
    h: Harness, mode: str, arguments: str, expected_error: str
) -> None:
    results = await run_tools(
        h,
        mode,
        JSONReply(completion(tool_calls=[call("echo", arguments)])),
        SSEReply(tool_call_chunks([("echo", arguments)], split=2)),
    )
    assert outcomes(results) == [("echo", pb.TOOL_OUTCOME_INVALID_ARGUMENTS)]
    assert expected_error in results[0].error
    assert results[0].arguments == arguments
    assert h.echo.calls == []


async def test_tool_disabled_for_the_stage_is_unknown_and_not_run(h: Harness) -> None:
    h.fake.script(JSONReply(completion(tool_calls=[call("echo", {"text": "nope"})])))
    response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage(tools=["calculator"])))
    assert [r.outcome for r in response.tool_results] == [pb.TOOL_OUTCOME_UNKNOWN_TOOL]
    assert "not enabled" in response.tool_results[0].error
    assert h.echo.calls == []


async def test_usage_only_chunk_without_choices_is_handled(h: Harness) -> None:
    chunks = tool_call_chunks([("echo", {"text": "u"})], usage=(10, 3))
    assert chunks[-1]["choices"] == []
    h.fake.script(SSEReply(chunks))
    events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage())))
    assert code == grpc.StatusCode.OK
    assert events[-1].done.tool_phase.usage.total_tokens == 13


async def test_backend_without_usage_or_finish_reason_still_finishes(h: Harness) -> None:
    chunks = [c for c in text_chunks("plain answer") if c["choices"][0]["finish_reason"] is None]
    h.fake.script(SSEReply(chunks, done=True))
    events, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage())))
    assert code == grpc.StatusCode.OK
    done = events[-1].done
    assert done.text == "plain answer"
    assert done.tool_phase.finish_reason == "" and not done.tool_phase.HasField("usage")


async def test_failing_and_timed_out_tools_do_not_stop_the_others(h: Harness) -> None:
    calls: list[tuple[str, Any]] = [
        ("misbehave", {"mode": "raise"}),
        ("misbehave", {"mode": "hang"}),
        ("misbehave", {"mode": "fail"}),
        ("echo", {"text": "still here"}),
    ]
    h.fake.script(JSONReply(completion(tool_calls=[call(n, a) for n, a in calls])))
    response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()))
    assert [r.outcome for r in response.tool_results] == [
        pb.TOOL_OUTCOME_FAILED,
        pb.TOOL_OUTCOME_TIMED_OUT,
        pb.TOOL_OUTCOME_FAILED,
        pb.TOOL_OUTCOME_OK,
    ]
    assert "the tool broke" in response.tool_results[0].error
    assert "Traceback" not in response.tool_results[0].error
    assert h.misbehave.cancelled == 1  # the hanging one was cancelled at its timeout
