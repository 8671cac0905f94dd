"""Structured logs: one record per stage end with its fields, JSON lines or text, and
neither prompts nor secrets unless `log_prompts` is set."""

from __future__ import annotations

import io
import json
import logging
import signal
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc
from toolchain_service.logs import FIELDS, configure_logging

from tests.conftest import Harness, collect, kinds, stage, start_harness, stop_harness
from tests.fakes.openai_backend import (
    FakeBackend,
    JSONReply,
    SSEReply,
    completion,
    text_chunks,
    tool_call_chunks,
)
from tests.fakes.server_process import serve_env, start_serve

USER_PROMPT = "UserPromptMarker-71d3 what is 2+3?"
SYSTEM_PROMPT = "SystemPromptMarker-9a0e be terse"
TOKEN = "BearerSecretMarker-4c2f"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("openai", "httpx", "httpx2", "httpcore")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def script_stage(fake: FakeBackend) -> None:
    fake.script(
        SSEReply(tool_call_chunks([("calculator", {"expression": "2+3"})], usage=(21, 7))),
        SSEReply(text_chunks("The answer is 5.", usage=(33, 5))),
    )


async def run_stage(h: Harness, stage_id: str = "logged-1") -> None:
    script_stage(h.fake)
    request = pb.StreamSynthesisRequest(
        stage=stage(USER_PROMPT, stage_id=stage_id, system_prompt=SYSTEM_PROMPT)
    )
    events, _ = await collect(h.stub.StreamSynthesis(request))
    assert kinds(events)[-1] == "done"


def stage_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "toolchain.stage"]


async def test_stage_end_record_carries_the_stage_fields(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolchain.stage")
    await run_stage(h)
    (record,) = stage_records(caplog)
    fields: dict[str, Any] = getattr(record, FIELDS)
    assert record.getMessage().startswith("stage logged-1 StreamSynthesis ok in ")
    assert fields["event"] == "stage_end"
    assert fields["stage_id"] == "logged-1"
    assert fields["rpc"] == "StreamSynthesis" and fields["outcome"] == "ok"
    assert fields["backend"] == "fake" and fields["model"] == ""
    assert fields["duration_ms"] > 0
    assert fields["tool_phase"]["usage"] == {"prompt": 21, "completion": 7}
    assert fields["tool_phase"]["model"] == "fake-model"
    assert fields["synthesis_phase"]["finish_reason"] == "stop"
    assert "user_prompt" not in fields and "system_prompt" not in fields


async def test_a_failed_stage_logs_its_code_reason_and_phase(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolchain.stage")
    events, _ = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage(backend="missing"))))
    assert kinds(events) == ["error"]
    (record,) = stage_records(caplog)
    fields = getattr(record, FIELDS)
    assert fields["outcome"] == "error" and fields["code"] == "NOT_FOUND"
    assert fields["reason"] == "NOT_FOUND" and "missing" in fields["message"]


async def test_prompts_are_not_logged_by_default(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything, from every logger
    await run_stage(h)
    assert stage_records(caplog)
    assert "PromptMarker" not in caplog.text
    for record in caplog.records:
        assert "PromptMarker" not in json.dumps(getattr(record, FIELDS, {}))


async def test_log_prompts_puts_the_prompts_into_the_stage_record(
    fake: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="toolchain.stage")
    h = await start_harness(fake, log_prompts=True)
    try:
        await run_stage(h)
    finally:
        await stop_harness(h)
    (record,) = stage_records(caplog)
    fields = getattr(record, FIELDS)
    assert fields["user_prompt"] == USER_PROMPT and fields["system_prompt"] == SYSTEM_PROMPT


async def test_json_lines_hold_the_stage_fields_as_fields_and_nothing_secret(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    out = io.StringIO()
    configure_logging("json", "DEBUG", stream=out)
    monkeypatch.setenv("TEST_TOOLCHAIN_TOKEN", TOKEN)
    h = await start_harness(fake, auth={"bearer_env_vars": ["TEST_TOOLCHAIN_TOKEN"]})
    try:
        script_stage(fake)
        request = pb.StreamSynthesisRequest(
            stage=stage(USER_PROMPT, stage_id="json-1", system_prompt=SYSTEM_PROMPT)
        )
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        events, _ = await collect(h.stub.StreamSynthesis(request, metadata=metadata))
        assert kinds(events)[-1] == "done"
        wrong = (("authorization", f"Bearer {TOKEN}-wrong"),)
        _, code = await collect(h.stub.StreamTools(pb.StreamToolsRequest(stage=stage()), metadata=wrong))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await stop_harness(h)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    (end,) = [line for line in lines if line["logger"] == "toolchain.stage"]
    assert end["level"] == "INFO" and end["message"].startswith("stage json-1 StreamSynthesis ok")
    assert end["event"] == "stage_end" and end["outcome"] == "ok" and end["stage_id"] == "json-1"
    assert isinstance(end["tool_phase"], dict) and end["tool_phase"]["usage"]["prompt"] == 21
    assert end["ts"].endswith("+00:00")
    text = out.getvalue()
    assert "PromptMarker" not in text
    assert "SecretMarker" not in text


async def test_text_lines_are_for_people(h: Harness, restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("text", "INFO", stream=out)
    h.fake.script(JSONReply(completion(content="hi")))
    await h.stub.RunTools(pb.RunToolsRequest(stage=stage(stage_id="text-1")))
    (line,) = [line for line in out.getvalue().splitlines() if " toolchain.stage: " in line]
    assert " INFO    toolchain.stage: stage text-1 RunTools ok in " in line
    assert " rpc=RunTools outcome=ok " in line and " stage_id=text-1 " in line
    assert ' tool_phase={"model":"fake-model",' in line  # nested fields as compact JSON


def test_json_formatter_keeps_tracebacks_and_plain_messages(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", stream=out)
    log = logging.getLogger("toolchain.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed: %s", "badly")
    log.info("plain", extra={FIELDS: {"message": "cannot override", "n": 1}})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "it failed: badly" and "ValueError: boom" in first["exc"]
    assert first["level"] == "ERROR" and first["logger"] == "toolchain.test"
    assert second["message"] == "plain" and second["n"] == 1


@pytest.mark.parametrize(("env_format", "flags"), [("json", ()), ("text", ("--log-format", "json"))])
async def test_serve_writes_json_log_lines_from_the_configuration_or_the_flag(
    fake: FakeBackend, env_format: str, flags: tuple[str, ...]
) -> None:
    server = await start_serve(serve_env(fake, LOG_FORMAT=env_format), *flags)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            script_stage(fake)
            request = pb.StreamSynthesisRequest(stage=stage(USER_PROMPT, stage_id="cli-1"))
            events, _ = await collect(pb_grpc.ToolchainServiceStub(channel).StreamSynthesis(request))
            assert kinds(events)[-1] == "done"
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait(10.0) == 0
    finally:
        await server.close()
    lines = [json.loads(line) for line in server.stderr_text.splitlines()]
    (end,) = [line for line in lines if line["logger"] == "toolchain.stage"]
    assert end["stage_id"] == "cli-1" and end["outcome"] == "ok" and end["rpc"] == "StreamSynthesis"
    assert end["synthesis_phase"]["usage"] == {"prompt": 33, "completion": 5}
    assert "PromptMarker" not in server.stderr_text
