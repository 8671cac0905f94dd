"""Bearer-token authentication as a grpc.aio server interceptor.

Every call must carry the metadata `authorization: Bearer <token>` with one of the
configured tokens (`auth.bearer_env_vars`, `auth.bearer_file`); otherwise it ends with
UNAUTHENTICATED before any handler runs, with a google.rpc.Status whose ErrorInfo reason
says which: MISSING_CREDENTIALS (no or malformed `authorization`) or INVALID_CREDENTIALS
(a token that is not accepted). Tokens are compared in constant time (hmac.compare_digest,
against every accepted token, so the time does not tell which one came close).

Exempt: the health service (`grpc.health.v1.Health`), so that load balancers and
orchestrator probes, which carry no credentials, can watch the server. Server reflection
is NOT exempt: it describes the whole API, and the tools that use it send headers
(`grpcurl -H 'authorization: Bearer ...'`, `buf curl -H ...`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from toolchain_service.errors import Code, StageError
from toolchain_service.transport import reflection
from toolchain_service.transport.status import grpc_status

EXEMPT_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
#: Reflection shows the public contract only; exempt unless `auth.public_reflection` is off.
REFLECTION_PREFIXES: tuple[str, ...] = tuple(f"/{name}/" for name in reflection.SERVICE_NAMES)
_HEADER = "authorization"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of a well-formed `authorization: Bearer <token>`, else None."""
    values = [v for k, v in metadata or () if k == _HEADER]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def principal(
    metadata: Iterable[tuple[str, str | bytes]] | None,
    peer_identity: Mapping[str, Iterable[bytes]] | None,
) -> str:
    """Who is calling, as stage ownership sees it: the mTLS client certificate's subject
    and a digest of the bearer token (never the token itself, which would end up in Redis
    and logs), whichever the server checks; "" when it checks neither. Only meaningful
    behind the checks (the interceptor, the TLS handshake)."""
    parts = []
    if peer_identity:
        for key in ("x509_subject", "x509_common_name"):
            subject = next(iter(peer_identity.get(key, ())), b"")
            if subject:
                parts.append("x509:" + subject.decode(errors="replace"))
                break
    token = bearer_token(metadata)
    if token is not None:
        parts.append("bearer:" + hashlib.sha256(token.encode()).hexdigest()[:32])
    return " ".join(parts)


class AuthenticationFailed(StageError):
    code = Code.UNAUTHENTICATED
    reason = "INVALID_CREDENTIALS"


def _missing(why: str) -> AuthenticationFailed:
    return AuthenticationFailed(
        f"{why}: send the metadata 'authorization: Bearer <token>'", reason="MISSING_CREDENTIALS"
    )


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generic
    def __init__(self, tokens: Iterable[bytes], exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES) -> None:
        self._tokens = tuple(tokens)
        if not self._tokens:
            raise ValueError("bearer auth needs at least one token")
        self._exempt = exempt_prefixes

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> AuthenticationFailed | None:
        """None when the metadata carries an accepted bearer token, else why not."""
        values = [v for k, v in metadata or () if k == _HEADER]
        if not values:
            return _missing("missing credentials")
        if len(values) > 1 or not isinstance(values[0], str):
            return _missing("malformed credentials")
        token = bearer_token(metadata)
        if token is None:
            return _missing("the authorization metadata is not 'Bearer <token>'")
        presented = token.encode()
        accepted = False
        for known in self._tokens:
            accepted |= hmac.compare_digest(presented, known)
        if not accepted:
            return AuthenticationFailed("invalid bearer token")
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(self._exempt):
            return handler
        failure = self.check(handler_call_details.invocation_metadata)
        if failure is None:
            return handler
        return _denying(handler, failure)


def _denying(
    handler: grpc.RpcMethodHandler[Any, Any], failure: StageError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that ends the call with `failure`."""
    status = grpc_status(failure)

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(status.code, status.details, status.trailing_metadata)

    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
