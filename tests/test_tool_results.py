"""A tool result longer than `tools.max_result_bytes` is cut, not failed: the call is OK
with `truncated` set, its result the start of the JSON text (never half a character)
followed by "[truncated: N more bytes]", and the model is shown that same text."""

from __future__ import annotations

import json
import re

import pytest
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_service.config import ToolSettings
from toolchain_service.tools.registry import truncated_text

from tests.conftest import stage, start_harness, stop_harness
from tests.fakes.openai_backend import (
    FakeBackend,
    JSONReply,
    SSEReply,
    call,
    completion,
    text_chunks,
    tool_call_chunks,
)

MARK = re.compile(r"\[truncated: (\d+) more bytes\]$")


@pytest.mark.parametrize("text", ["x" * 5000, "é" * 3000, "🙂" * 2000, "a" + "€" * 999])
@pytest.mark.parametrize("limit", [256, 257, 258, 259, 1000])
def test_truncation_cuts_at_a_character_boundary_and_counts_what_it_left_out(text: str, limit: int) -> None:
    cut = truncated_text(text, limit)
    mark = MARK.search(cut)
    assert mark is not None, cut[-40:]
    kept = cut[: mark.start()]
    assert text.startswith(kept)  # whole characters only: decoding never replaced one
    assert len(cut.encode("utf-8")) <= limit
    assert int(mark.group(1)) == len(text.encode("utf-8")) - len(kept.encode("utf-8"))
    assert len(kept.encode("utf-8")) > limit - 40  # it keeps what fits, not much less


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_result_over_the_cap_is_truncated_and_the_model_sees_the_same_text(
    fake: FakeBackend, mode: str
) -> None:
    tools = ToolSettings(max_result_bytes=300, weather_url=f"{fake.base_url}/weather-unused")
    h = await start_harness(fake, tools=tools)
    try:
        text = "née " * 500  # multi-byte characters, so a byte cut could split one
        full = json.dumps({"text": text}, ensure_ascii=False)
        if mode == "unary":
            fake.script(JSONReply(completion(tool_calls=[call("echo", {"text": text})])))
            fake.script(JSONReply(completion("it said née a lot")))
            response = await h.stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()), timeout=30)
            (result,) = response.tool_results
        else:
            fake.script(SSEReply(tool_call_chunks([("echo", {"text": text})])))
            fake.script(SSEReply(text_chunks("it said née a lot")))
            events = [
                r.event
                async for r in h.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage()), timeout=30)
            ]
            (result,) = next(e.tool_summary for e in events if e.HasField("tool_summary")).results
        assert result.outcome == pb.TOOL_OUTCOME_OK and result.truncated
        shown = result.result.string_value
        mark = MARK.search(shown)
        assert mark is not None and full.startswith(shown[: mark.start()])
        assert int(mark.group(1)) == len(full.encode()) - len(shown[: mark.start()].encode())
        assert len(shown.encode()) <= 300
        (tool_message,) = [m for m in fake.requests[1]["messages"] if m["role"] == "tool"]
        assert tool_message["content"] == shown
        assert h.echo.calls == [text]  # it ran once; only its result was cut
    finally:
        await stop_harness(h)


async def test_a_result_within_the_cap_is_kept_whole(fake: FakeBackend) -> None:
    tools = ToolSettings(max_result_bytes=300, weather_url=f"{fake.base_url}/weather-unused")
    h = await start_harness(fake, tools=tools)
    try:
        fake.script(JSONReply(completion(tool_calls=[call("echo", {"text": "short"})])))
        response = await h.stub.RunTools(pb.RunToolsRequest(stage=stage()), timeout=30)
        (result,) = response.tool_results
        assert result.outcome == pb.TOOL_OUTCOME_OK and not result.truncated
        assert result.result.struct_value.fields["text"].string_value == "short"
    finally:
        await stop_harness(h)
