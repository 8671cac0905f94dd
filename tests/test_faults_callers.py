"""Callers that send bad input or misbehave get a clear status and cannot leave anything
running: invalid fields are INVALID_ARGUMENT with one BadRequest violation per field
(validated once, at the edge, before any backend call); unknown names are NOT_FOUND
listing what exists; bytes that are not a valid request (invalid UTF-8) are
INVALID_ARGUMENT naming the field, not UNKNOWN with a traceback; duplicate running ids
are ALREADY_EXISTS; short deadlines, slow readers and cancellation at any point of the
stage end cleanly."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.conftest import Harness, detail, kinds, stage
from tests.fakes.openai_backend import (
    HangReply,
    JSONReply,
    Reply,
    SSEReply,
    call,
    completion,
    text_chunks,
    tool_call_chunks,
)
from tests.fault_checks import (
    Faults,
    Outcome,
    assert_clean_text,
    assert_failed,
    assert_stream_ended,
    run,
    status_of,
    violations,
    wait_for,
)

MODES = ["unary", "stream"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- invalid fields ------------------------------------------------------------------------


def tool_phase(**options: Any) -> pb.StageRequest:
    return stage(tool_phase=pb.PhaseOptions(**options))


def synthesis_phase(**options: Any) -> pb.StageRequest:
    return stage(synthesis_phase=pb.PhaseOptions(**options))


TP, SP = "stage.tool_phase", "stage.synthesis_phase"
BAD_FIELDS: list[tuple[str, Callable[[], pb.StageRequest], str, str]] = [
    ("empty-prompt", lambda: stage(""), "stage.user_prompt", "is required"),
    ("blank-prompt", lambda: stage(" \n\t "), "stage.user_prompt", "is required"),
    ("long-prompt", lambda: stage("p" * 1001), "stage.user_prompt", "at most 1000"),
    ("long-system", lambda: stage(system_prompt="s" * 1001), "stage.system_prompt", "at most 1000"),
    ("negative-tokens", lambda: tool_phase(max_tokens=-5), f"{TP}.max_tokens", "-5"),
    ("zero-tokens", lambda: synthesis_phase(max_tokens=0), f"{SP}.max_tokens", "between 1 and"),
    ("absurd-tokens", lambda: tool_phase(max_tokens=2_000_000_000), f"{TP}.max_tokens", "2000000000"),
    ("cold", lambda: tool_phase(temperature=-0.1), f"{TP}.temperature", "between 0.0 and 2.0"),
    ("hot", lambda: synthesis_phase(temperature=2.5), f"{SP}.temperature", "2.5"),
    ("nan", lambda: tool_phase(temperature=math.nan), f"{TP}.temperature", "nan"),
    ("infinite", lambda: tool_phase(temperature=math.inf), f"{TP}.temperature", "inf"),
    ("long-id", lambda: stage(stage_id="i" * 129), "stage.stage_id", "at most 128"),
    ("id-with-space", lambda: stage(stage_id="my stage"), "stage.stage_id", "printable ASCII"),
    ("id-not-ascii", lambda: stage(stage_id="étape"), "stage.stage_id", "printable ASCII"),
    ("long-backend", lambda: stage(backend="b" * 300), "stage.backend", "at most 256"),
    ("long-model", lambda: stage(model="m" * 300), "stage.model", "at most 256"),
    ("empty-tool-name", lambda: stage(tools=["echo", ""]), "stage.tools[1]", "tool name"),
    ("too-many-tools", lambda: stage(tools=[f"t{i}" for i in range(200)]), "stage.tools", "at most 128"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("request_", "field", "description"),
    [case[1:] for case in BAD_FIELDS],
    ids=[case[0] for case in BAD_FIELDS],
)
async def test_invalid_field_is_one_bad_request_violation_and_nothing_is_called(
    faults: Faults, mode: str, request_: Callable[[], pb.StageRequest], field: str, description: str
) -> None:
    h = await faults.start(max_prompt_chars=1000)
    outcome = await run(h, mode, request_(), synthesis=True)
    assert_failed(outcome, INVALID, "INVALID_REQUEST", retryable=False, message=field)
    assert list(violations(outcome)) == [field]
    assert description in violations(outcome)[field]
    if outcome.events:
        assert kinds(outcome.events) == ["error"]
    assert h.fake.request_count == 0


@pytest.mark.parametrize("mode", MODES)
async def test_every_invalid_field_is_reported_at_once(faults: Faults, mode: str) -> None:
    h = await faults.start()
    bad = pb.StageRequest(
        stage_id="has space",
        user_prompt="",
        tool_phase=pb.PhaseOptions(max_tokens=-1, temperature=math.nan),
        synthesis_phase=pb.PhaseOptions(max_tokens=10**9),
        tools=[""],
    )
    outcome = await run(h, mode, bad)
    assert sorted(violations(outcome)) == [
        "stage.stage_id",
        "stage.synthesis_phase.max_tokens",
        "stage.tool_phase.max_tokens",
        "stage.tool_phase.temperature",
        "stage.tools[0]",
        "stage.user_prompt",
    ]


async def test_request_without_a_stage_is_invalid(faults: Faults) -> None:
    h = await faults.start()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.RunSynthesis(pb.RunSynthesisRequest())
    outcome = Outcome(caught.value.code(), caught.value.details() or "", status_of(caught.value))
    assert_failed(outcome, INVALID, "INVALID_REQUEST", retryable=False)
    assert list(violations(outcome)) == ["stage.user_prompt"]


# -- unknown names --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("request_", "lists"),
    [
        (stage(backend="gpt-99"), "configured backends: fake"),
        (stage(model="gpt-99"), "available: fake-model, small-model"),
        (stage(tools=["echo", "launch_rockets"]), "available: calculator, current_time, echo"),
    ],
    ids=["backend", "model", "tool"],
)
async def test_unknown_name_is_not_found_and_lists_what_exists(
    faults: Faults, mode: str, request_: pb.StageRequest, lists: str
) -> None:
    h = await faults.start(backend={"models": ("fake-model", "small-model")})
    outcome = await run(h, mode, request_)
    assert_failed(outcome, grpc.StatusCode.NOT_FOUND, "NOT_FOUND", retryable=False, message=lists)
    assert "gpt-99" in outcome.message or "launch_rockets" in outcome.message
    assert h.fake.request_count == 0


# -- bytes that are not a valid request -------------------------------------------------


def with_invalid_utf8(message: Any, marker: str = "MARK") -> Callable[[Any], bytes]:
    """A request serializer that writes `message` with the marker's bytes replaced by
    invalid UTF-8 of the same length (what a buggy or hostile client can send)."""
    raw = message.SerializeToString()
    assert raw.count(marker.encode()) == 1
    bad = raw.replace(marker.encode(), b"\xff\xfe\xc0\x80")
    return lambda _: bad


INVALID_UTF8 = [
    ("user_prompt", stage("MARK"), "stage.user_prompt"),
    ("system_prompt", stage(system_prompt="MARK"), "stage.system_prompt"),
    ("stage_id", stage(stage_id="MARK"), "stage.stage_id"),
    ("model", stage(model="MARK"), "stage.model"),
    ("tool", stage(tools=["echo", "MARK"]), "stage.tools[1]"),
]


@pytest.mark.parametrize(
    ("method", "wrap"),
    [
        ("RunTools", pb.RunToolsRequest),
        ("RunSynthesis", pb.RunSynthesisRequest),
        ("StreamTools", pb.StreamToolsRequest),
        ("StreamSynthesis", pb.StreamSynthesisRequest),
    ],
)
@pytest.mark.parametrize(
    ("request_", "field"), [case[1:] for case in INVALID_UTF8], ids=[case[0] for case in INVALID_UTF8]
)
async def test_invalid_utf8_in_a_string_field_is_invalid_argument_naming_the_field(
    faults: Faults, method: str, wrap: Any, request_: pb.StageRequest, field: str
) -> None:
    h = await faults.start()
    path = f"/toolchain.v1.ToolchainService/{method}"
    serializer = with_invalid_utf8(wrap(stage=request_))
    if method.startswith("Run"):
        unary = h.channel.unary_unary(path, request_serializer=serializer, response_deserializer=bytes)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(None)
        outcome = Outcome(caught.value.code(), caught.value.details() or "", status_of(caught.value))
    else:
        response_type = pb.StreamToolsResponse if method == "StreamTools" else pb.StreamSynthesisResponse
        stream = h.channel.unary_stream(
            path, request_serializer=serializer, response_deserializer=response_type.FromString
        )
        events: list[pb.StageEvent] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in stream(None):
                events.append(response.event)
        outcome = Outcome(caught.value.code(), caught.value.details() or "", status_of(caught.value), events)
        assert_stream_ended(outcome)
        assert kinds(events) == ["error"]
    assert_failed(outcome, INVALID, "INVALID_REQUEST", retryable=False, message="not valid UTF-8")
    assert violations(outcome) == {field: "is not valid UTF-8"}
    assert h.fake.request_count == 0


async def test_bytes_that_are_no_message_at_all_are_invalid_argument(faults: Faults) -> None:
    h = await faults.start()
    garbage = h.channel.unary_unary(
        "/toolchain.v1.ToolchainService/RunTools",
        request_serializer=lambda _: b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
        response_deserializer=bytes,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await garbage(None)
    outcome = Outcome(caught.value.code(), caught.value.details() or "", status_of(caught.value))
    assert_failed(outcome, INVALID, "INVALID_REQUEST", retryable=False)
    assert "not a valid toolchain.v1.RunToolsRequest message" in outcome.message


@pytest.mark.parametrize(
    ("path", "message", "field"),
    [
        ("/toolchain.v1.ToolchainService/CancelStage", pb.CancelStageRequest(stage_id="MARK"), "stage_id"),
        ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(service="MARK"), "service"),
    ],
    ids=["cancel-stage", "health"],
)
async def test_invalid_utf8_is_invalid_argument_for_every_service(
    faults: Faults, path: str, message: Any, field: str
) -> None:
    h = await faults.start()
    method = h.channel.unary_unary(
        path, request_serializer=with_invalid_utf8(message), response_deserializer=bytes
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await method(None)
    assert caught.value.code() == INVALID
    status = status_of(caught.value)
    assert status is not None
    bad = detail(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [(field, "is not valid UTF-8")]


async def test_request_larger_than_the_server_accepts_is_refused_and_the_server_carries_on(
    faults: Faults,
) -> None:
    h = await faults.start(max_request_bytes=4096)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.RunTools(pb.RunToolsRequest(stage=stage("p" * 10_000)))
    # grpc refuses it before any handler runs, so there are no google.rpc.Status details.
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_clean_text(caught.value.details() or "", "status message")
    h.fake.script(JSONReply(completion("still serving")))
    assert (await h.stub.RunTools(pb.RunToolsRequest(stage=stage()))).text == "still serving"


# -- duplicate ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_duplicate_id_of_a_running_stage_is_already_exists_and_the_first_is_unharmed(
    faults: Faults, mode: str
) -> None:
    h = await faults.start()
    gate = asyncio.Event()

    async def answer_when_let_through(body: dict[str, Any]) -> Reply:
        await gate.wait()
        return SSEReply(text_chunks("first stage answer"))

    h.fake.handler = answer_when_let_through
    first = h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(stage_id="twin")))
    await h.fake.wait_requests(1)  # the first stage is running
    outcome = await run(h, mode, stage(stage_id="twin"))
    assert_failed(outcome, grpc.StatusCode.ALREADY_EXISTS, "STAGE_ALREADY_RUNNING", retryable=False)
    assert "'twin'" in outcome.message
    gate.set()
    events = [response.event async for response in first]
    assert kinds(events)[-1] == "done" and events[-1].done.text == "first stage answer"
    assert h.fake.request_count == 1


# -- deadlines ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("timeout", [0.001, 0.05, 0.3])
async def test_deadline_too_short_for_the_stage_ends_it_with_deadline_exceeded(
    faults: Faults, mode: str, timeout: float
) -> None:
    h = await faults.start()
    h.fake.default = HangReply()
    outcome = await run(h, mode, timeout=timeout)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await faults.settled(h)


# -- slow readers ---------------------------------------------------------------------------

BIG = 64 << 20


async def big_stream(
    faults: Faults, stage_id: str, timeout: float | None = None
) -> tuple[Harness, grpc.aio.Channel, Any]:
    """A stage whose output (~32 MB) is far more than the transports buffer, on a channel
    that accepts its large Done event."""
    h = await faults.start(backend={"max_response_bytes": BIG})
    h.fake.script(SSEReply(text_chunks("x" * (16 << 10) * 2000, pieces=2000)))
    channel = grpc.aio.insecure_channel(h.server.address, options=[("grpc.max_receive_message_length", BIG)])
    request = pb.StreamToolsRequest(stage=stage(stage_id=stage_id))
    return h, channel, pb_grpc.ToolchainServiceStub(channel).StreamTools(request, timeout=timeout)


async def test_slow_reader_holds_back_the_stage_and_then_gets_every_event(faults: Faults) -> None:
    h, channel, call_ = await big_stream(faults, "slow-reader")
    try:
        first = await call_.read()
        await asyncio.sleep(0.5)  # the reader pauses: nothing may pile up without bound meanwhile
        assert len(h.server.stages) == 1 and h.fake.active_responses == 1  # held back by flow control
        events = [first.event]
        while (response := await call_.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            events.append(response.event)
        outcome = Outcome(await call_.code(), events=events)
        assert_stream_ended(outcome)
        assert outcome.code == grpc.StatusCode.OK and len(outcome.done.text) == (16 << 10) * 2000
    finally:
        await channel.close(None)


@pytest.mark.parametrize("how", ["deadline", "cancel", "cancel_stage"])
async def test_reader_that_stops_reading_is_ended_cleanly(faults: Faults, how: str) -> None:
    h, channel, call_ = await big_stream(faults, "stalled-reader", timeout=2.0 if how == "deadline" else None)
    try:
        await call_.read()
        if how == "cancel":
            call_.cancel()
        elif how == "cancel_stage":
            await h.stub.CancelStage(pb.CancelStageRequest(stage_id="stalled-reader"))
        # The server ends the stage and its backend request although the reader reads nothing.
        await wait_for(lambda: len(h.server.stages) == 0, "the stage ended")
        await h.fake.wait_idle()
        if how != "cancel":  # what was sent is still there to read, then the call's end
            async with asyncio.timeout(10):
                outcome = Outcome(grpc.StatusCode.OK)
                try:
                    while (response := await call_.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                        outcome.events.append(response.event)
                except grpc.aio.AioRpcError as err:
                    outcome.code = err.code()
            expected = grpc.StatusCode.DEADLINE_EXCEEDED if how == "deadline" else grpc.StatusCode.CANCELLED
            assert outcome.code == expected, kinds(outcome.events)[-3:]
            assert "done" not in kinds(outcome.events)
    finally:
        call_.cancel()  # the reader gives up too; its own call task ends
        await channel.close(None)
    await faults.settled(h)


# -- cancellation at every point of the stage --------------------------------------------

POINTS = ["before-backend-answers", "mid-tool-phase", "during-tools", "mid-synthesis"]


def script_point(h: Harness, mode: str, point: str) -> None:
    tool_call = ("misbehave", {"mode": "ok", "seconds": 30})
    if point == "before-backend-answers":
        h.fake.script(HangReply())
    elif point == "mid-tool-phase":
        h.fake.script(
            SSEReply(tool_call_chunks([("echo", {"text": "x"})], split=4), stall_after=2)
            if mode == "stream"
            else HangReply(send_headers=True)
        )
    elif point == "during-tools":
        h.fake.script(
            SSEReply(tool_call_chunks([tool_call]))
            if mode == "stream"
            else JSONReply(completion(tool_calls=[call(*tool_call)]))
        )
    else:
        h.fake.script(
            SSEReply(tool_call_chunks([("echo", {"text": "x"})]))
            if mode == "stream"
            else JSONReply(completion(tool_calls=[call("echo", {"text": "x"})])),
            SSEReply(text_chunks("one two three"), stall_after=2) if mode == "stream" else HangReply(),
        )


async def reach(h: Harness, point: str) -> None:
    async with asyncio.timeout(5):
        if point == "during-tools":
            await h.misbehave.started_event.wait()
        else:
            await h.fake.wait_requests(2 if point == "mid-synthesis" else 1)
            if point == "mid-synthesis":
                await asyncio.sleep(0.05)  # let the first synthesis chunks out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("how", ["client", "cancel_stage"])
async def test_cancelling_at_any_point_leaves_nothing_running(
    faults: Faults, mode: str, point: str, how: str
) -> None:
    h = await faults.start()
    script_point(h, mode, point)
    request = stage(stage_id=f"{point}-{mode}-{how}")
    task = asyncio.ensure_future(run(h, mode, request, synthesis=True))
    await reach(h, point)
    if how == "client":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await h.stub.CancelStage(pb.CancelStageRequest(stage_id=request.stage_id))
        outcome = await task
        assert outcome.code == grpc.StatusCode.CANCELLED
        if mode == "stream":
            assert kinds(outcome.events)[-1] == "cancel"
            assert outcome.events[-1].cancel.reason == pb.CANCEL_REASON_CANCEL_STAGE
    await faults.settled(h)
    if point == "during-tools":
        assert (h.misbehave.cancelled, h.misbehave.finished) == (1, 0)
    if point != "during-tools":
        await h.fake.wait_disconnect(5.0)  # the backend request was closed, not left to run
