"""The fake OpenAI backend speaks the real wire format: checked with the real openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionToolParam

from tests.fakes.openai_backend import (
    CloseReply,
    ErrorReply,
    FakeBackend,
    HangReply,
    JSONReply,
    RawEvent,
    RawReply,
    Reply,
    SSEReply,
    call,
    completion,
    stage_handler,
    text_chunks,
    tool_call_chunks,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MESSAGES: Any = [{"role": "user", "content": "What is 2+3?"}]
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    }
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    async with FakeBackend() as backend:
        yield backend


@pytest.fixture
async def client(fake: FakeBackend) -> AsyncIterator[openai.AsyncOpenAI]:
    oai = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=5.0)
    yield oai
    await oai.close()


async def collect(client: openai.AsyncOpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    stream = await client.chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True, **kwargs
    )
    return [chunk async for chunk in stream]


# --- builders + openai client --------------------------------------------------------------------------


async def test_non_streamed_tool_calls_parse(fake: FakeBackend, client: openai.AsyncOpenAI) -> None:
    fake.script(
        JSONReply(
            completion(
                tool_calls=[
                    call("calculator", {"expression": "2+3"}, id="call_a"),
                    call("calculator", '{"expression": "4*5"}', id="call_b"),
                ],
                usage=(21, 9),
            )
        )
    )
    resp = await client.chat.completions.create(model="fake-model", messages=MESSAGES, tools=TOOLS)

    choice = resp.choices[0]
    assert resp.object == "chat.completion"
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    tool_calls = choice.message.tool_calls
    assert tool_calls is not None
    assert [tc.id for tc in tool_calls] == ["call_a", "call_b"]
    assert all(tc.type == "function" for tc in tool_calls)
    functions = [tc.function for tc in tool_calls]  # type: ignore[union-attr]
    assert [(f.name, json.loads(f.arguments)) for f in functions] == [
        ("calculator", {"expression": "2+3"}),
        ("calculator", {"expression": "4*5"}),
    ]
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (21, 9, 30)

    # What the fake saw.
    assert fake.request_count == 1
    assert fake.requests[0]["model"] == "fake-model"
    assert fake.requests[0]["messages"] == MESSAGES
    assert fake.requests[0]["tools"][0]["function"]["name"] == "calculator"
    assert "stream" not in fake.requests[0]
    assert fake.headers[0]["authorization"] == "Bearer x"
    assert fake.headers[0]["content-type"] == "application/json"


async def test_default_reply_and_script_order(fake: FakeBackend, client: openai.AsyncOpenAI) -> None:
    fake.script(completion("first"), JSONReply(completion("second")))
    answers = []
    for _ in range(3):
        resp = await client.chat.completions.create(model="fake-model", messages=MESSAGES)
        answers.append(resp.choices[0].message.content)
    assert answers == ["first", "second", "ok"]
    assert fake.pending == 0

    fake.handler = lambda body: JSONReply(completion(f"echo {body['messages'][0]['content']}"))
    resp = await client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert resp.choices[0].message.content == "echo What is 2+3?"

    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]


async def test_streamed_text_reassembles_with_usage_chunk(
    fake: FakeBackend, client: openai.AsyncOpenAI
) -> None:
    text = "Hello there,  brave new world! "
    fake.script(SSEReply(text_chunks(text, usage=(7, 5))))
    chunks = await collect(client, stream_options={"include_usage": True})

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 5  # split by words
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None] * 6 + ["stop"]
    # Usage-only chunk: last, with empty choices (stream_options.include_usage).
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (7, 5)
    assert all(c.usage is None for c in chunks[:-1])
    assert fake.requests[0]["stream"] is True
    assert fake.requests[0]["stream_options"] == {"include_usage": True}


async def test_streamed_text_in_n_pieces(fake: FakeBackend, client: openai.AsyncOpenAI) -> None:
    fake.script(SSEReply(text_chunks("abcdefghij", pieces=3, finish_reason="length"), delay=0.001))
    chunks = await collect(client)
    pieces = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert pieces == ["abc", "defg", "hij"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("repeat", [False, True], ids=["openai-style", "repeat-id-and-name"])
async def test_streamed_tool_call_deltas(fake: FakeBackend, client: openai.AsyncOpenAI, repeat: bool) -> None:
    calls = [("calculator", '{"expression": "2+3"}'), ("lookup", '{"query": "weather in Paris"}')]
    fake.script(
        SSEReply(
            tool_call_chunks(calls, split=3, repeat_id_and_name=repeat, usage=(30, 12), ids=["c1", "c2"])
        )
    )
    chunks = await collect(client, tools=TOOLS)

    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(deltas) == 2 * (1 + 3)
    assert chunks[0].choices[0].delta.role == "assistant"
    args: dict[int, str] = {}
    for position, tc in enumerate(deltas):
        assert tc.function is not None
        first_of_call = position % 4 == 0
        assert tc.index == position // 4
        if first_of_call or repeat:
            assert tc.id == ["c1", "c2"][tc.index]
            assert tc.type == "function"
            assert tc.function.name == calls[tc.index][0]
        else:
            assert tc.id is None
            assert tc.type is None
            assert tc.function.name is None
        if first_of_call:
            assert tc.function.arguments == ""
        else:
            assert tc.function.arguments
        args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert args == {0: calls[0][1], 1: calls[1][1]}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 42


# --- errors, disconnects, connections -----------------------------------------------------------------------


async def test_error_reply_429_raises_rate_limit(fake: FakeBackend, client: openai.AsyncOpenAI) -> None:
    fake.script(ErrorReply(429, "Slow down", headers={"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="fake-model", messages=MESSAGES)
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "7"
    assert err.message.endswith("Slow down")
    assert isinstance(err.body, dict)
    assert err.body["type"] == "rate_limit_error"
    assert err.body["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (ErrorReply(500, "boom"), openai.InternalServerError),
        (ErrorReply(401, "bad key"), openai.AuthenticationError),
        (ErrorReply(400, "bad request"), openai.BadRequestError),
        (CloseReply(), openai.APIConnectionError),
        (SSEReply(text_chunks("one two three four"), cut_after=2), openai.APIConnectionError),
    ],
    ids=["500", "401", "400", "close", "cut"],
)
async def test_failures_map_to_openai_errors(
    fake: FakeBackend, client: openai.AsyncOpenAI, reply: Reply, error: type[Exception]
) -> None:
    fake.script(reply)
    received: list[ChatCompletionChunk] = []
    with pytest.raises(error):
        stream = await client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
        async for chunk in stream:
            received.append(chunk)
    if isinstance(reply, SSEReply):
        assert len(received) == 2  # the events before the cut arrived intact
    assert fake.disconnects == 0  # errors and server-side cuts are not client disconnects
    await fake.wait_idle(1.0)


async def test_hang_then_client_timeout_counts_disconnect(
    fake: FakeBackend, client: openai.AsyncOpenAI
) -> None:
    fake.script(HangReply())
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="fake-model", messages=MESSAGES, timeout=0.2)
    assert await fake.wait_disconnect(2.0) == 1
    await fake.wait_idle(1.0)
    assert fake.active_responses == 0


async def test_hang_then_task_cancellation_counts_disconnect(
    fake: FakeBackend, client: openai.AsyncOpenAI
) -> None:
    fake.script(HangReply(send_headers=True))
    task = asyncio.create_task(client.chat.completions.create(model="fake-model", messages=MESSAGES))
    await fake.wait_requests(1, 2.0)
    assert fake.active_responses == 1
    assert fake.disconnects == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.wait_disconnect(2.0)
    await fake.wait_idle(1.0)


async def test_stalled_stream_closed_by_client_counts_disconnect(
    fake: FakeBackend, client: openai.AsyncOpenAI
) -> None:
    fake.script(SSEReply(text_chunks("alpha beta gamma delta"), stall_after=2))
    stream = await client.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True)
    received = [await stream.__anext__(), await stream.__anext__()]
    assert received[1].choices[0].delta.content == "alpha"
    assert fake.active_responses == 1
    await stream.close()
    await fake.wait_disconnect(2.0)
    await fake.wait_idle(1.0)


async def test_open_connections_track_keepalive_and_close(fake: FakeBackend) -> None:
    assert fake.open_connections == 0
    oai = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
    for _ in range(3):  # keep-alive: one connection reused
        await oai.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert fake.open_connections == 1
    assert fake.total_connections == 1

    # Two concurrent requests need two connections.
    fake.script(JSONReply(completion("slow"), delay=0.1), JSONReply(completion("slow"), delay=0.1))
    await asyncio.gather(
        *(oai.chat.completions.create(model="fake-model", messages=MESSAGES) for _ in range(2))
    )
    assert fake.open_connections == 2

    await oai.close()
    await fake.wait_connections(0, 2.0)
    assert fake.open_connections == 0
    assert fake.disconnects == 0


# --- raw wire format ----------------------------------------------------------------------------------------


async def raw_post(fake: FakeBackend, reply: Reply) -> tuple[int, str, bytes]:
    fake.script(reply)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.base_url}/chat/completions", json={"model": "m", "messages": []}) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def test_raw_sse_framing_and_garbage_events(fake: FakeBackend) -> None:
    events: list[Any] = [{"a": 1}, "{not json", b"\xff\xfe", RawEvent(b": keep-alive\n\n")]
    status, content_type, body = await raw_post(fake, SSEReply(events))
    assert status == 200
    assert content_type.startswith("text/event-stream")
    assert body == b'data: {"a":1}\n\ndata: {not json\n\ndata: \xff\xfe\n\n: keep-alive\n\ndata: [DONE]\n\n'

    _, _, body = await raw_post(fake, SSEReply([{"b": 2}], done=False))
    assert body == b'data: {"b":2}\n\n'


async def test_raw_bodies(fake: FakeBackend) -> None:
    assert await raw_post(fake, JSONReply("{truncated", status=201)) == (
        201,
        "application/json",
        b"{truncated",
    )
    assert await raw_post(fake, RawReply(b"\x80\x81", status=502, content_type="text/plain")) == (
        502,
        "text/plain",
        b"\x80\x81",
    )
    huge = b"x" * (4 << 20)
    assert (await raw_post(fake, RawReply(huge)))[2] == huge


async def test_handler_errors_and_bad_requests(fake: FakeBackend) -> None:
    def broken(body: dict[str, Any]) -> Reply:
        raise RuntimeError("nope")

    fake.handler = broken
    status, _, body = await raw_post(fake, JSONReply({}))  # the scripted reply goes first
    assert (status, body) == (200, b"{}")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fake.base_url}/chat/completions", json={"messages": []}) as resp:
            assert resp.status == 500
            assert "nope" in (await resp.json())["error"]["message"]
        async with session.post(f"{fake.base_url}/chat/completions", data=b"{oops") as resp:
            assert resp.status == 400
        async with session.get(f"{fake.base_url}/nothing") as resp:
            assert resp.status == 404
    assert [type(e) for e in fake.errors] == [RuntimeError]
    assert fake.request_count == 2  # the invalid JSON body is not a chat request


# --- benchmark scenario -------------------------------------------------------------------------------------


async def test_stage_scenario_in_process() -> None:
    async with FakeBackend(handler=stage_handler(chunks=8), record=False) as fake:
        async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0) as oai:
            resp = await oai.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
            tool_calls = resp.choices[0].message.tool_calls
            assert tool_calls is not None
            assert tool_calls[0].function.name == "calculator"  # type: ignore[union-attr]
            assert json.loads(tool_calls[0].function.arguments) == {"expression": "2+3"}  # type: ignore[union-attr]

            stream = await oai.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, stream=True)
            chunks = [c async for c in stream]
            arguments = "".join(
                tc.function.arguments or ""
                for c in chunks
                if c.choices
                for tc in c.choices[0].delta.tool_calls or []
                if tc.function is not None
            )
            assert json.loads(arguments) == {"expression": "2+3"}
            assert chunks[-1].usage is not None

            after_tool = [*MESSAGES, {"role": "tool", "tool_call_id": "x", "content": "5"}]
            stream = await oai.chat.completions.create(
                model="m", messages=after_tool, tools=TOOLS, stream=True
            )
            chunks = [c async for c in stream]
            assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 8
            resp = await oai.chat.completions.create(model="m", messages=MESSAGES)
            assert resp.choices[0].message.content
        assert fake.requests == []
        assert fake.request_count == 4


async def test_cli_process_prints_ready_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.openai_backend",
        "--port",
        "0",
        "--scenario",
        "stage",
        "--chunks",
        "5",
        "--chunk-delay",
        "0.001",
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10.0)
        word, port = line.decode().split()
        assert word == "READY"
        assert int(port) > 0
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        ) as oai:
            chunks = await collect(oai)
            assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 10.0)
    assert proc.returncode == 0, stderr.decode()
    assert b"requests=1" in stderr
