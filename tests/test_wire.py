"""The light parse of the OpenAI wire format (backends/wire.py) gives what the openai
package's own pydantic models give for the same payloads: the proof behind skipping a
model per streamed chunk."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from toolchain_service.backends import wire

from tests.fakes.openai_backend import call, completion, text_chunks, tool_call_chunks

CHUNK_STREAMS: list[list[dict[str, Any]]] = [
    text_chunks("The answer is 5.", usage=(10, 4)),
    text_chunks("split into pieces", pieces=5),
    tool_call_chunks([("calculator", {"expression": "2+3"}), ("echo", {"text": "x"})], split=4, usage=(3, 2)),
    tool_call_chunks([("echo", {"text": "llama"})], split=3, repeat_id_and_name=True),
]


@pytest.mark.parametrize("chunks", CHUNK_STREAMS)
def test_streamed_chunks_parse_like_openai_chat_completion_chunk(chunks: list[dict[str, Any]]) -> None:
    for raw in chunks:
        text = json.dumps(raw)
        ours = wire.parse_chunk(wire.loads(text))
        theirs = ChatCompletionChunk.model_validate_json(text)
        if not theirs.choices:
            assert (ours.content, ours.tool_calls, ours.finish_reason) == ("", (), "")
        else:
            choice = theirs.choices[0]
            assert ours.content == (choice.delta.content or "")
            assert ours.finish_reason == (choice.finish_reason or "")
            expected = [
                (
                    tc.index,
                    tc.id or "",
                    (tc.function.name if tc.function else None) or "",
                    (tc.function.arguments if tc.function else None) or "",
                )
                for tc in choice.delta.tool_calls or []
            ]
            assert [(d.index, d.id, d.name, d.arguments) for d in ours.tool_calls] == expected
        if theirs.usage is None:
            assert ours.usage is None
        else:
            assert ours.usage is not None
            assert (ours.usage.prompt_tokens, ours.usage.completion_tokens, ours.usage.total_tokens) == (
                theirs.usage.prompt_tokens,
                theirs.usage.completion_tokens,
                theirs.usage.total_tokens,
            )


@pytest.mark.parametrize(
    "body",
    [
        completion(content="plain answer", usage=(7, 3)),
        completion(
            tool_calls=[call("calculator", {"expression": "1+1"}, id="c1"), call("echo", '{"text": "y"}')]
        ),
        completion(content=None, finish_reason="length"),
    ],
)
def test_unstreamed_completion_parses_like_openai_chat_completion(body: dict[str, Any]) -> None:
    text = json.dumps(body)
    ours = wire.parse_completion(wire.loads(text))
    theirs = ChatCompletion.model_validate_json(text)
    message = theirs.choices[0].message
    assert ours.content == (message.content or "")
    assert ours.finish_reason == theirs.choices[0].finish_reason
    assert [(c.id, c.name, c.arguments) for c in ours.tool_calls] == [
        (tc.id, tc.function.name, tc.function.arguments)  # type: ignore[union-attr]
        for tc in message.tool_calls or []
    ]
    assert (ours.usage is None) == (theirs.usage is None)
