"""How a client reaches a server with auth or TLS on: a bearer token, TLS, mutual TLS.

    ToolchainClient(target, token="...", credentials=tls_credentials(ca_file="ca.pem"))
    ToolchainClient(target, credentials=tls_credentials(ca_file="ca.pem",
                                                         cert_file="me.pem", key_file="me.key"))

The token travels as `authorization: Bearer <token>` metadata on every call; over
plaintext it travels in the clear (the server warns about that configuration too).
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path!r}: {exc.strerror}") from None


def tls_credentials(
    *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials: `ca_file` (PEM) to trust instead of the system roots, and
    `cert_file` + `key_file` (PEM) to present a client certificate (mutual TLS)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA file"),
        private_key=_read(key_file, "client key file"),
        certificate_chain=_read(cert_file, "client certificate file"),
    )


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a bearer token; none without a token."""
    if not token:
        return ()
    if token != token.strip() or any(c in token for c in "\r\n"):
        raise ValueError("the bearer token has surrounding whitespace or a line break")
    return (("authorization", f"Bearer {token}"),)
