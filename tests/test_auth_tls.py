"""Bearer-token auth (an interceptor) and TLS / mutual TLS from certificate files, with
certificates made at test time."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from tests.conftest import Harness, collect, detail, kinds, rich_status, stage, start_harness, stop_harness
from tests.fakes.grpcurl import grpcurl
from tests.fakes.openai_backend import FakeBackend, JSONReply, SSEReply, completion, text_chunks
from tests.fakes.pki import PKI, make_pki
from tests.fakes.server_process import run_to_end

TOKEN = "tok-env-5f1c2a9e"
FILE_TOKEN = "tok-file-77d0b3"
SERVICE = "toolchain.v1.ToolchainService"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture
async def authed(
    fake: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    monkeypatch.setenv("TEST_TOOLCHAIN_TOKEN", TOKEN)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one per line\n{FILE_TOKEN}\n")
    harness = await start_harness(
        fake, auth={"bearer_env_vars": ["TEST_TOOLCHAIN_TOKEN"], "bearer_file": str(tokens)}
    )
    yield harness
    await stop_harness(harness)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def unauthenticated(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return caught.value


# -- bearer tokens ---------------------------------------------------------------------


async def test_a_call_without_credentials_is_unauthenticated_with_a_clear_message(authed: Harness) -> None:
    err = await unauthenticated(authed.stub.ListTools(pb.ListToolsRequest()))
    assert err.details() == "missing credentials: send the metadata 'authorization: Bearer <token>'"
    assert detail(rich_status(err), error_details_pb2.ErrorInfo).reason == "MISSING_CREDENTIALS"


async def test_an_unknown_token_is_unauthenticated(authed: Harness) -> None:
    err = await unauthenticated(authed.stub.ListTools(pb.ListToolsRequest(), metadata=bearer("guess")))
    assert err.details() == "invalid bearer token"
    assert detail(rich_status(err), error_details_pb2.ErrorInfo).reason == "INVALID_CREDENTIALS"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", TOKEN, f"Bearer  {TOKEN}x"])
async def test_malformed_authorization_metadata_is_unauthenticated(authed: Harness, value: str) -> None:
    await unauthenticated(authed.stub.ListTools(pb.ListToolsRequest(), metadata=(("authorization", value),)))


@pytest.mark.parametrize("token", [TOKEN, FILE_TOKEN], ids=["from-env", "from-file"])
async def test_a_configured_token_is_accepted(authed: Harness, token: str) -> None:
    authed.fake.script(JSONReply(completion(content="hello")))
    response = await authed.stub.RunTools(pb.RunToolsRequest(stage=stage()), metadata=bearer(token))
    assert response.text == "hello"
    lowercase_scheme = (("authorization", f"bearer {token}"),)
    tools = await authed.stub.ListTools(pb.ListToolsRequest(), metadata=lowercase_scheme)
    assert tools.tools


async def test_a_stream_without_credentials_never_reaches_the_backend(authed: Harness) -> None:
    events, code = await collect(authed.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage())))
    assert code == grpc.StatusCode.UNAUTHENTICATED and events == []
    authed.fake.script(SSEReply(text_chunks("fine")))
    events, code = await collect(
        authed.stub.StreamSynthesis(pb.StreamSynthesisRequest(stage=stage()), metadata=bearer(TOKEN))
    )
    assert code == grpc.StatusCode.OK and kinds(events)[-1] == "done"
    assert authed.fake.request_count == 1


async def test_cancel_stage_needs_credentials_too(authed: Harness) -> None:
    await unauthenticated(authed.stub.CancelStage(pb.CancelStageRequest(stage_id="x")))


async def test_health_is_exempt_from_auth(authed: Harness) -> None:
    response = await health_pb2_grpc.HealthStub(authed.channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpcurl_health_check_needs_no_token_because_reflection_is_public(authed: Harness) -> None:
    # grpcurl asks reflection before every call: with auth on, health must work without a token.
    code, out, err = await grpcurl("-plaintext", authed.server.address, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out)["status"] == "SERVING"
    code, out, err = await grpcurl("-plaintext", authed.server.address, "describe", SERVICE)
    assert code == 0, err


async def test_grpcurl_calls_need_the_token_though_reflection_does_not(authed: Harness) -> None:
    code, _, err = await grpcurl("-plaintext", authed.server.address, f"{SERVICE}/ListTools")
    assert code != 0 and "Unauthenticated" in err and "MISSING_CREDENTIALS" in err
    code, out, err = await grpcurl(
        "-plaintext", "-H", f"authorization: Bearer {TOKEN}", authed.server.address, f"{SERVICE}/ListTools"
    )
    assert code == 0, err
    assert "calculator" in {t["name"] for t in json.loads(out)["tools"]}


async def test_reflection_can_require_the_token(fake: FakeBackend, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    harness = await start_harness(fake, auth={"bearer_file": str(tokens), "public_reflection": False})
    try:
        code, _, err = await grpcurl("-plaintext", harness.server.address, "list")
        assert code != 0 and "Unauthenticated" in err
        code, out, err = await grpcurl(
            "-plaintext", "-H", f"authorization: Bearer {TOKEN}", harness.server.address, "list"
        )
        assert code == 0, err
        assert SERVICE in out.split()
    finally:
        await stop_harness(harness)


# -- TLS ---------------------------------------------------------------------------------


def tls_settings(pki: PKI, *, mutual: bool) -> dict[str, str]:
    settings = {"cert_file": str(pki.server.cert_file), "key_file": str(pki.server.key_file)}
    if mutual:
        settings["client_ca_file"] = str(pki.ca_file)
    return settings


async def list_tools(channel: grpc.aio.Channel) -> pb.ListToolsResponse:
    return await pb_grpc.ToolchainServiceStub(channel).ListTools(pb.ListToolsRequest(), timeout=5)


async def test_tls_call_works_and_a_plaintext_client_fails(fake: FakeBackend, pki: PKI) -> None:
    harness = await start_harness(fake, tls=tls_settings(pki, mutual=False))
    address = harness.server.address
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca)
        async with grpc.aio.secure_channel(address, credentials) as channel:
            assert (await list_tools(channel)).tools
            fake.script(JSONReply(completion(content="over TLS")))
            stub = pb_grpc.ToolchainServiceStub(channel)
            response = await stub.RunSynthesis(pb.RunSynthesisRequest(stage=stage()), timeout=5)
            assert response.text == "over TLS"

        async with grpc.aio.insecure_channel(address) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_tools(plaintext)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        untrusting = grpc.ssl_channel_credentials(root_certificates=pki.stranger.cert)
        async with grpc.aio.secure_channel(address, untrusting) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_tools(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_harness(harness)


async def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(
    fake: FakeBackend, pki: PKI
) -> None:
    harness = await start_harness(fake, tls=tls_settings(pki, mutual=True))
    address = harness.server.address
    try:
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca)
        async with grpc.aio.secure_channel(address, no_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_tools(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        foreign = grpc.ssl_channel_credentials(pki.ca, pki.stranger.key, pki.stranger.cert)
        async with grpc.aio.secure_channel(address, foreign) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_tools(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        client = grpc.ssl_channel_credentials(pki.ca, pki.client.key, pki.client.cert)
        async with grpc.aio.secure_channel(address, client) as channel:
            assert (await list_tools(channel)).tools
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop_harness(harness)


async def test_with_mutual_tls_only_the_certificate_that_started_a_stage_may_cancel_it(
    fake: FakeBackend, pki: PKI
) -> None:
    harness = await start_harness(fake, tls=tls_settings(pki, mutual=True))
    address = harness.server.address
    alice = grpc.ssl_channel_credentials(pki.ca, pki.client.key, pki.client.cert)
    bob = grpc.ssl_channel_credentials(pki.ca, pki.other_client.key, pki.other_client.cert)
    try:
        async with (
            grpc.aio.secure_channel(address, alice) as alices,
            grpc.aio.secure_channel(address, bob) as bobs,
        ):
            fake.script(SSEReply(text_chunks("this answer stalls"), stall_after=2))
            stream = pb_grpc.ToolchainServiceStub(alices).StreamTools(
                pb.StreamToolsRequest(stage=stage(stage_id="alices-stage")), timeout=30
            )
            first = await stream.read()
            assert isinstance(first, pb.StreamToolsResponse) and first.event.HasField("chunk")
            for stage_id in ("alices-stage", "nobodys-stage"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pb_grpc.ToolchainServiceStub(bobs).CancelStage(
                        pb.CancelStageRequest(stage_id=stage_id), timeout=5
                    )
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await pb_grpc.ToolchainServiceStub(alices).CancelStage(
                pb.CancelStageRequest(stage_id="alices-stage"), timeout=5
            )
            events, code = await collect(stream)
            assert code == grpc.StatusCode.CANCELLED
            assert events[-1].cancel.reason == pb.CANCEL_REASON_CANCEL_STAGE
    finally:
        await stop_harness(harness)


async def test_tls_and_bearer_auth_together(
    fake: FakeBackend, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_TOOLCHAIN_TOKEN", TOKEN)
    harness = await start_harness(
        fake, tls=tls_settings(pki, mutual=False), auth={"bearer_env_vars": ["TEST_TOOLCHAIN_TOKEN"]}
    )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca)
        async with grpc.aio.secure_channel(harness.server.address, credentials) as channel:
            stub = pb_grpc.ToolchainServiceStub(channel)
            await unauthenticated(stub.ListTools(pb.ListToolsRequest(), timeout=5))
            assert (await stub.ListTools(pb.ListToolsRequest(), timeout=5, metadata=bearer(TOKEN))).tools
    finally:
        await stop_harness(harness)


async def test_grpcurl_calls_through_tls_with_a_client_certificate(fake: FakeBackend, pki: PKI) -> None:
    harness = await start_harness(fake, tls=tls_settings(pki, mutual=True))
    try:
        tls_args = ["-cacert", str(pki.ca_file), "-cert", str(pki.client.cert_file)]
        tls_args += ["-key", str(pki.client.key_file)]
        code, out, err = await grpcurl(*tls_args, harness.server.address, f"{SERVICE}/ListTools")
        assert code == 0, err
        assert '"name": "calculator"' in out
    finally:
        await stop_harness(harness)


# -- the CLI reaches a server with auth, TLS and mutual TLS ------------------------------


async def cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TOOLCHAIN_TOKEN"}
    if token is not None:
        env["TOOLCHAIN_TOKEN"] = token
    return await run_to_end(sys.executable, "-m", "toolchain_client", *args, env=env, timeout=60)


async def test_cli_sends_a_bearer_token_from_the_option_or_the_environment(authed: Harness) -> None:
    address = authed.server.address
    code, _, err = await cli("tools", "--target", address)
    assert code == 1 and "UNAUTHENTICATED" in err and "MISSING_CREDENTIALS" in err
    code, out, err = await cli("tools", "--target", address, "--token", TOKEN)
    assert code == 0, err
    assert "calculator" in out
    authed.fake.script(JSONReply(completion(content="authenticated answer")))
    code, out, err = await cli("run", "--target", address, "--unary", "hello", token=TOKEN)
    assert code == 0, err
    assert "authenticated answer" in out


async def test_cli_speaks_mutual_tls_with_a_client_certificate(fake: FakeBackend, pki: PKI) -> None:
    harness = await start_harness(fake, tls=tls_settings(pki, mutual=True))
    address = harness.server.address
    try:
        code, _, err = await cli("tools", "--target", address, "--ca-file", str(pki.ca_file))
        assert code == 1 and "UNAVAILABLE" in err  # the server wants a client certificate
        tls = ["--ca-file", str(pki.ca_file), "--cert-file", str(pki.client.cert_file)]
        code, out, err = await cli("tools", "--target", address, *tls, "--key-file", str(pki.client.key_file))
        assert code == 0, err
        assert "calculator" in out
    finally:
        await stop_harness(harness)


async def test_cli_names_an_unreadable_tls_file_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    code, out, err = await cli("tools", "--target", "127.0.0.1:1", "--ca-file", str(missing))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: cannot read the CA file '{missing}': No such file or directory"
    ]
