"""A backend that is unreachable, failing, too slow or cut off ends the call cleanly, with
the status a caller can act on: UNAVAILABLE (retry helps, RetryInfo), FAILED_PRECONDITION
(the server's configuration), INVALID_ARGUMENT, NOT_FOUND or INTERNAL. Each case runs
unary (the backend answers JSON) and streamed (SSE); the `faults` fixture then checks that
nothing is left running and that no log line leaks internals or the API key."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import grpc
import pytest

from tests.fakes.openai_backend import (
    CloseReply,
    ErrorReply,
    HangReply,
    JSONReply,
    RawEvent,
    RawReply,
    Reply,
    SSEReply,
    completion,
    text_chunks,
)
from tests.fault_checks import SECRET, Faults, assert_failed, run

MODES = ["unary", "stream"]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def closed_port() -> int:
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- unreachable ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("base_url", "problem"),
    [
        (lambda fake: f"http://127.0.0.1:{closed_port()}/v1", "connection refused"),
        (lambda fake: "http://toolchain-fault-test.invalid/v1", "host name not found"),
        (lambda fake: fake.base_url.replace("http://", "https://"), "TLS"),
    ],
    ids=["connection-refused", "dns-failure", "tls-failure"],
)
async def test_unreachable_backend_is_unavailable_and_names_the_problem(
    faults: Faults, mode: str, base_url: object, problem: str
) -> None:
    assert callable(base_url)
    h = await faults.start(backend={"base_url": base_url(faults.fake)})
    outcome = await run(h, mode)
    assert_failed(outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message=problem)
    assert "cannot reach backend 'fake'" in outcome.message


@pytest.mark.parametrize("mode", MODES)
async def test_connection_closed_without_a_response_is_unavailable(faults: Faults, mode: str) -> None:
    h = await faults.start()
    h.fake.script(CloseReply())
    outcome = await run(h, mode)
    assert_failed(outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="closed")


# -- HTTP errors ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_are_unavailable_and_retryable(faults: Faults, mode: str, status: int) -> None:
    h = await faults.start()
    h.fake.script(ErrorReply(status, "the model server is sad"))
    outcome = await run(h, mode)
    assert_failed(
        outcome,
        UNAVAILABLE,
        "BACKEND_UNAVAILABLE",
        retryable=True,
        message=f"HTTP {status}): the model server is sad",
    )


@pytest.mark.parametrize("mode", MODES)
async def test_rate_limit_with_retry_after_tells_the_caller_when_to_retry(faults: Faults, mode: str) -> None:
    h = await faults.start()
    h.fake.script(ErrorReply(429, "slow down", headers={"Retry-After": "7"}))
    outcome = await run(h, mode)
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_RATE_LIMITED", retryable=True, message="HTTP 429", retry_delay=7.0
    )


async def test_rate_limit_with_an_http_date_retry_after_is_understood(faults: Faults) -> None:
    h = await faults.start()
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    h.fake.script(ErrorReply(429, headers={"Retry-After": when}))
    outcome = await run(h, "unary")
    assert_failed(outcome, UNAVAILABLE, "BACKEND_RATE_LIMITED", retryable=True, retry_delay=20.0)


@pytest.mark.parametrize("mode", MODES)
async def test_rate_limit_without_retry_after_is_still_retryable(faults: Faults, mode: str) -> None:
    h = await faults.start()
    h.fake.script(ErrorReply(429))
    outcome = await run(h, mode)
    assert_failed(outcome, UNAVAILABLE, "BACKEND_RATE_LIMITED", retryable=True, message="rate limiting")
    if outcome.events:  # the backend named no delay: the default, the same as the status's RetryInfo
        assert outcome.error.retry_delay.ToNanoseconds() == 1_000_000_000


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_are_the_servers_configuration_problem(
    faults: Faults, mode: str, status: int
) -> None:
    h = await faults.start()
    h.fake.script(ErrorReply(status, f"Incorrect API key provided: {SECRET}"))
    outcome = await run(h, mode)
    assert_failed(
        outcome,
        grpc.StatusCode.FAILED_PRECONDITION,
        "BACKEND_AUTH_FAILED",
        retryable=False,
        message=str(status),
    )
    assert "server's operator" in outcome.message and "configuration" in outcome.message
    assert h.fake.headers[0]["authorization"] == f"Bearer {SECRET}"  # the key was sent, never echoed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [400, 422])
async def test_backend_rejecting_the_request_is_invalid_argument(
    faults: Faults, mode: str, status: int
) -> None:
    h = await faults.start()
    h.fake.script(ErrorReply(status, f"max_tokens is too large (your key {SECRET} is fine)"))
    outcome = await run(h, mode)
    assert_failed(
        outcome,
        grpc.StatusCode.INVALID_ARGUMENT,
        "BACKEND_REJECTED_REQUEST",
        retryable=False,
        message="max_tokens is too large",
    )
    assert "[redacted]" in outcome.message  # the backend echoed the key; the caller never sees it


@pytest.mark.parametrize("mode", MODES)
async def test_model_the_backend_does_not_serve_is_not_found(faults: Faults, mode: str) -> None:
    h = await faults.start()
    h.fake.script(ErrorReply(404, "The model `nope` does not exist"))
    outcome = await run(h, mode)
    assert_failed(
        outcome, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", retryable=False, message="fake-model"
    )


async def test_error_object_inside_a_successful_stream_ends_it_unavailable(faults: Faults) -> None:
    h = await faults.start()
    chunks = text_chunks("partial answer")
    h.fake.script(
        SSEReply([*chunks[:2], {"error": {"message": "the GPU fell over", "type": "server_error"}}])
    )
    outcome = await run(h, "stream")
    assert_failed(outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="the GPU fell over")
    assert [e.chunk.content for e in outcome.events[:-1]] == ["partial"]


async def test_error_object_in_a_200_json_body_is_unavailable(faults: Faults) -> None:
    h = await faults.start()
    h.fake.script(JSONReply({"error": {"message": "overloaded, try again"}}))
    outcome = await run(h, "unary")
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="overloaded, try again"
    )


# -- too slow ---------------------------------------------------------------------------


SLOW = {"read_timeout": 0.3}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reply", [HangReply(), HangReply(send_headers=True)], ids=["no-status", "no-body"])
async def test_backend_sending_nothing_times_out_unavailable_and_is_disconnected(
    faults: Faults, mode: str, reply: Reply
) -> None:
    h = await faults.start(backend=SLOW)
    h.fake.script(reply)
    outcome = await run(h, mode)
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="did not answer in time"
    )
    await h.fake.wait_disconnect(5.0)


async def test_stream_stalling_mid_way_times_out_after_its_chunks(faults: Faults) -> None:
    h = await faults.start(backend={**SLOW, "max_retries": 2})
    h.fake.script(SSEReply(text_chunks("one two three four"), stall_after=3))
    outcome = await run(h, "stream")
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="did not answer in time"
    )
    assert "".join(e.chunk.content for e in outcome.events[:-1]) == "one two"
    assert h.fake.request_count == 1  # output had reached the caller: not retried
    await h.fake.wait_disconnect(5.0)


async def test_backend_trickling_forever_is_cut_at_the_request_timeout(faults: Faults) -> None:
    h = await faults.start(backend={"request_timeout": 0.5, "read_timeout": 0.4})
    h.fake.script(SSEReply(text_chunks("word " * 1000), delay=0.02))
    outcome = await run(h, "stream")
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="did not finish within"
    )
    await h.fake.wait_disconnect(5.0)


async def test_sse_keepalive_comments_do_not_hold_a_stage_past_the_request_timeout(faults: Faults) -> None:
    # `: ping` comments every 20 ms keep each read alive; they must count toward the total.
    h = await faults.start(backend={"request_timeout": 0.5, "read_timeout": 0.4})
    first = text_chunks("thinking", pieces=1)[1]
    first["choices"][0]["finish_reason"] = None
    h.fake.script(SSEReply([first, *[RawEvent(b": ping\n\n")] * 1000], done=False, delay=0.02))
    outcome = await run(h, "stream")
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="did not finish within 0.5 s"
    )
    await h.fake.wait_disconnect(5.0)


async def test_unstreamed_body_trickling_forever_is_cut_at_the_request_timeout(faults: Faults) -> None:
    h = await faults.start(backend={"request_timeout": 0.5, "read_timeout": 0.4})
    h.fake.script(
        SSEReply(
            [RawEvent(b" ")] * 1000, done=False, delay=0.02, headers={"Content-Type": "application/json"}
        )
    )
    outcome = await run(h, "unary")
    assert_failed(outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="in time")
    await h.fake.wait_disconnect(5.0)


# -- cut off ----------------------------------------------------------------------------


async def test_stream_ending_without_finish_reason_or_done_is_unavailable(faults: Faults) -> None:
    h = await faults.start()
    unfinished = [c for c in text_chunks("half an answer") if not c["choices"][0]["finish_reason"]]
    h.fake.script(SSEReply(unfinished, done=False))
    outcome = await run(h, "stream")
    assert_failed(outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="before it finished")


async def test_stream_cut_in_the_middle_of_an_event_is_unavailable(faults: Faults) -> None:
    h = await faults.start()
    chunks = text_chunks("cut here")
    h.fake.script(SSEReply([*chunks[:2], RawEvent(b'data: {"id": "chatcmpl-1", "choi')], cut_after=3))
    outcome = await run(h, "stream")
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="cut the response short"
    )


async def test_json_body_cut_mid_way_is_unavailable(faults: Faults) -> None:
    h = await faults.start()
    body = b'{"id": "chatcmpl-1", "object": "chat.completion", "choi'
    h.fake.script(SSEReply([RawEvent(body)], cut_after=1, headers={"Content-Type": "application/json"}))
    outcome = await run(h, "unary")
    assert_failed(
        outcome, UNAVAILABLE, "BACKEND_UNAVAILABLE", retryable=True, message="cut the response short"
    )


async def test_complete_but_truncated_json_body_is_a_protocol_error(faults: Faults) -> None:
    h = await faults.start()
    h.fake.script(RawReply(b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "hi'))
    outcome = await run(h, "unary")
    assert_failed(
        outcome, grpc.StatusCode.INTERNAL, "BACKEND_PROTOCOL_ERROR", retryable=False, message="not valid JSON"
    )


# -- far too large ------------------------------------------------------------------------

LIMIT = 4096
TOO_LARGE = "BACKEND_RESPONSE_TOO_LARGE"


@pytest.mark.parametrize(
    "reply",
    [
        JSONReply(completion("x" * 100_000)),
        SSEReply([RawEvent(b"{" + b" " * 100_000)], done=False, headers={"Content-Type": "application/json"}),
    ],
    ids=["declared-length", "chunked"],
)
async def test_json_body_far_larger_than_any_real_one_is_refused(faults: Faults, reply: Reply) -> None:
    h = await faults.start(backend={"max_response_bytes": LIMIT})
    h.fake.script(reply)
    outcome = await run(h, "unary")
    assert_failed(outcome, grpc.StatusCode.INTERNAL, TOO_LARGE, retryable=False, message=f"{LIMIT} bytes")


@pytest.mark.parametrize(
    "reply",
    [
        SSEReply(text_chunks("y" * 100_000, pieces=1)),
        SSEReply(text_chunks("many small pieces " * 2000)),
        SSEReply([RawEvent(b"data: " + b"z" * 100_000)], done=False),
    ],
    ids=["one-huge-event", "many-events", "endless-line"],
)
async def test_stream_far_larger_than_any_real_one_is_refused(faults: Faults, reply: Reply) -> None:
    h = await faults.start(backend={"max_response_bytes": LIMIT})
    h.fake.script(reply)
    outcome = await run(h, "stream")
    assert_failed(outcome, grpc.StatusCode.INTERNAL, TOO_LARGE, retryable=False, message=f"{LIMIT} bytes")
    delivered = sum(len(e.chunk.content) for e in outcome.events)
    assert delivered <= LIMIT
