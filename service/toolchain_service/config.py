"""Typed server configuration (pydantic-settings).

Sources, highest priority first: keyword arguments, environment variables prefixed
`TOOLCHAIN_` (nested keys joined with `__`, e.g. `TOOLCHAIN_BACKENDS__VLLM__BASE_URL`;
complex values may also be given as JSON, e.g. `TOOLCHAIN_BACKENDS='{"vllm": {...}}'`),
then an optional TOML file named by `TOOLCHAIN_CONFIG_FILE`, then the defaults below.
With no configuration at all the server listens on 127.0.0.1:50051 and serves the
embedded local model. Sources are merged key by key: a per-key variable such as
`TOOLCHAIN_BACKENDS__VLLM__BASE_URL` adds to (or changes one key of) the backends of the
lower sources, the default `local` one included; a table given whole (`[backends.*]` in
the file, JSON in `TOOLCHAIN_BACKENDS`) replaces the defaults. A `TOOLCHAIN_*` variable
that is no setting is an error, not ignored (`NOT_SETTINGS`: the clients' own).

Secrets are never configuration values, so no dump of the settings can show one: a
backend names the environment variable that holds its API key, and bearer-token auth
names the environment variables and/or the file that hold the accepted tokens; they are
read by `AuthSettings.load_tokens()` when the server starts.

`load_settings()` turns every problem (a bad value from any source, TOML syntax, JSON in
an environment variable) into one `ConfigError` whose message names each bad key.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

CONFIG_FILE_ENV = "TOOLCHAIN_CONFIG_FILE"
ENV_PREFIX = "TOOLCHAIN_"

_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})$")


def check_host_port(value: str) -> str:
    """`host:port` (IPv6 hosts in brackets), port 0-65535; 0 picks a free port."""
    match = _HOST_PORT.match(value)
    if match is None or int(match.group(1)) > 65535:
        raise ValueError(f"must be host:port (e.g. 127.0.0.1:50051 or [::]:50051), got {value!r}")
    return value


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or blocked
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendSettings(_Strict):
    """One named model backend."""

    kind: Literal["openai", "local"] = Field(
        "openai",
        description="openai: any OpenAI-compatible HTTP server; local: the embedded model (a supervised"
        " llama.cpp llama-server child process)",
    )
    base_url: str = Field(
        "",
        description="chat-completions base URL, e.g. http://127.0.0.1:8000/v1",
        validate_default=True,
    )
    api_key_env: str = Field("", description="name of the environment variable holding the API key")
    default_model: str = Field("", description="model used when a request names none")
    models: tuple[str, ...] = Field((), description="models callers may request; empty: any")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to open a connection")
    read_timeout: float = Field(60.0, gt=0, description="seconds the backend may stay silent")
    request_timeout: float = Field(300.0, gt=0, description="seconds one backend call may take")
    max_retries: int = Field(2, ge=0, le=10, description="retries of transient failures before output")
    max_connections: int = Field(256, ge=1, description="HTTP connection pool size")
    max_response_bytes: int = Field(8 << 20, ge=1024, description="largest body or SSE event accepted")
    read_buffer_bytes: int = Field(
        64 << 10,
        ge=1024,
        le=16 << 20,
        description="a stage's read buffer for its backend's response: while its caller does not read, "
        "the HTTP client stops reading the socket once about twice this is unread",
    )
    merge_deltas: bool = Field(
        True,
        description="stream the deltas that arrived together as one chunk (fewer, fuller events); "
        "false: one chunk per backend delta",
    )
    extra_body: dict[str, Any] = Field({}, description="extra JSON fields sent with every request")
    num_predict_option: bool = Field(False, description="also send options.num_predict (Ollama)")
    forces_tool_choice: bool = Field(
        True,
        description="whether the backend honours tool_choice 'required' and a named tool; "
        "false: it is asked with 'auto' (a named choice still offers only that tool)",
    )
    streams_tool_calls: bool | None = Field(
        None, description="whether a streamed tool_choice=auto works; unset: the kind's default"
    )
    tool_parser: str | None = Field(
        None,
        description="how tool calls written in the message content are read: native (structured"
        " tool_calls only), json, hermes, mistral, llama3_json, pythonic, or several joined by '+'"
        " and tried in order; unset: the kind's default (openai: hermes+json, local: native)",
    )
    model_path: str = Field(
        "",
        description="local: GGUF file; empty: the bundled SmolLM2-135M-Instruct",
        validate_default=True,
    )
    n_ctx: int = Field(2048, ge=256, description="local: context window in tokens, per sequence")
    n_threads: int = Field(0, ge=0, description="local: CPU threads; 0: all cores")
    parallel: int = Field(
        4, ge=1, le=64, description="local: sequences generated at once (batched); more requests queue"
    )
    server_binary: str = Field(
        "",
        description="local: the llama-server executable; empty: beside the Python executable or on PATH",
        validate_default=True,
    )
    start_timeout: float = Field(
        120.0, gt=0, description="local: seconds the model process may take to start"
    )
    watchdog_timeout: float = Field(
        5.0, gt=0, description="local: seconds /health may stay silent (twice) before the process is killed"
    )
    restart_initial_backoff: float = Field(
        0.5, gt=0, description="local: first wait before restarting a model process that died (doubles)"
    )
    restart_max_backoff: float = Field(
        30.0, gt=0, description="local: longest wait between restarts of a model process that keeps dying"
    )
    tool_results_as_user: bool = Field(
        False,
        description="send tool results as user messages (servers whose chat template drops tool messages,"
        " e.g. llama.cpp's chatml-function-calling)",
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "openai":  # absent: kind itself was invalid
            if not value:
                raise ValueError("an openai backend needs base_url (e.g. http://127.0.0.1:8000/v1)")
            if not value.startswith(("http://", "https://")):
                raise ValueError(f"must start with http:// or https://, got {value!r}")
        elif info.data.get("kind") == "local" and value:
            raise ValueError(
                "a local backend runs its own model process and takes no base_url; for a server"
                ' at a URL, configure a backend with kind = "openai"'
            )
        return value

    @field_validator("model_path", "server_binary")
    @classmethod
    def _check_local_files(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") != "local":
            return value
        from toolchain_service.backends import local_model  # noqa: PLC0415 - config stays light

        check = (
            local_model.model_path_problem
            if info.field_name == "model_path"
            else local_model.server_binary_problem
        )
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("tool_parser")
    @classmethod
    def _check_tool_parser(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        from toolchain_service.toolcalls import parser_problem  # noqa: PLC0415 - config stays light

        problem = parser_problem(value)
        if problem:
            raise ValueError(problem)
        if info.data.get("kind") == "local" and value != "native":
            raise ValueError(
                "the local backend constrains its tool calls by a grammar and returns them"
                f" structured; tool_parser can only be 'native', got {value!r}"
            )
        return value

    def effective_tool_parser(self) -> str:
        """The configured tool parser, or the kind's default. local: native (its calls are
        grammar-constrained and come back structured). openai: hermes+json, what the
        generic tool instructions ask models without native tool calling for, read
        strictly: `<tool_call>` blocks, or an answer that is a call object naming an
        offered tool with arguments; a plain JSON answer is never a call."""
        if self.tool_parser is not None:
            return self.tool_parser
        return "native" if self.kind == "local" else "hermes+json"

    def api_key(self) -> str:
        """The key from the environment; many local servers accept any non-empty key."""
        return os.environ.get(self.api_key_env, "") if self.api_key_env else "unused"


class PhaseDefaults(_Strict):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0, le=2.0)


class ToolSettings(_Strict):
    enabled: tuple[str, ...] = Field(
        (),
        description="tools offered, by name (built-in, plugin and MCP tools alike); empty: every tool"
        " of every source (the built-ins, the plugins named in `plugins`, the MCP servers' tools)",
    )
    plugins: tuple[str, ...] = Field(
        (),
        description="entry points of the group `toolchain.tools` to load (installed tool plugins);"
        " empty: none, since loading a plugin runs its code",
    )
    timeout: float = Field(10.0, gt=0, description="seconds a tool call may run")
    max_calls_per_stage: int = Field(16, ge=1, description="tool calls executed per stage; more: SKIPPED")
    max_result_bytes: int = Field(
        64 << 10,
        ge=256,
        description="largest JSON result kept per call; a longer one is cut to this size and marked",
    )
    weather_url: str = Field(
        "https://api.open-meteo.com/v1/forecast",
        description="get_weather: Open-Meteo-compatible forecast API",
    )


_MCP_SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)


def _check_env_set(names: Any) -> None:
    for name in names:
        if not os.environ.get(name, ""):
            raise ValueError(f"environment variable {name} is not set or empty")


class McpServerSettings(_Strict):
    """One MCP server whose tools the server offers: a command run over stdio, or a
    streamable-HTTP URL. Secrets (tokens) are never configuration values: headers and the
    child's extra variables name environment variables of this server that hold them."""

    command: str = Field("", description="stdio: the executable that runs the MCP server")
    args: tuple[str, ...] = Field((), description="stdio: its arguments")
    env: dict[str, str] = Field({}, description="stdio: extra environment variables (not secrets)")
    env_vars: tuple[str, ...] = Field(
        (), description="stdio: names of this server's environment variables passed on to the child"
    )
    cwd: str = Field("", description="stdio: working directory; empty: this server's")
    url: str = Field("", description="streamable HTTP: the MCP endpoint, e.g. http://127.0.0.1:8000/mcp")
    headers_env: dict[str, str] = Field(
        {},
        description="streamable HTTP: header name -> name of the environment variable holding its value",
    )
    tool_prefix: str = Field(
        "", description="put before each of its tool names (e.g. 'github_'), to keep names apart"
    )
    timeout: float | None = Field(
        None, gt=0, description="seconds a call of its tools may run; unset: tools.timeout"
    )
    connect_timeout: float = Field(
        30.0, gt=0, description="seconds to start or reach the server and list its tools"
    )
    reconnect_initial_backoff: float = Field(
        0.5, gt=0, description="first wait before reconnecting to a server that went away (doubles)"
    )
    reconnect_max_backoff: float = Field(30.0, gt=0, description="longest wait between reconnection attempts")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value

    @field_validator("env_vars")
    @classmethod
    def _check_env_vars(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        _check_env_set(names)
        return names

    @field_validator("headers_env")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for header in headers:
            if not _HEADER_NAME.match(header):
                raise ValueError(f"{header!r} is not an HTTP header name")
        _check_env_set(headers.values())
        return headers

    @model_validator(mode="after")
    def _check_transport(self) -> McpServerSettings:
        if bool(self.command) == bool(self.url):
            raise ValueError("set either command (stdio) or url (streamable HTTP)")
        stdio_only = {"args": self.args, "env": self.env, "env_vars": self.env_vars, "cwd": self.cwd}
        if self.url and any(stdio_only.values()):
            given = ", ".join(k for k, v in stdio_only.items() if v)
            raise ValueError(f"{given}: only for a command (stdio) server, not a url")
        if self.command and self.headers_env:
            raise ValueError("headers_env: only for a url (streamable HTTP) server")
        return self

    def headers(self) -> dict[str, str]:
        """The HTTP headers, their values read from the environment now."""
        return {header: os.environ.get(var, "") for header, var in self.headers_env.items()}

    def child_env(self) -> dict[str, str]:
        """The extra environment of the stdio child, passed-on variables read now."""
        passed = {name: os.environ[name] for name in self.env_vars if name in os.environ}
        return {**self.env, **passed}


def _readable_pem(path: str, marker: str, what: str) -> str:
    if not path:
        return path
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    if marker not in text:
        raise ValueError(f"{path!r} is not a PEM {what} (no '-----BEGIN ...{marker}-----' block)")
    return path


class TLSSettings(_Strict):
    """TLS for the gRPC port; with `client_ca_file`, mutual TLS."""

    cert_file: str = Field("", description="PEM certificate chain of the server; empty: plaintext")
    key_file: str = Field("", description="PEM private key of cert_file")
    client_ca_file: str = Field(
        "", description="PEM CA bundle; set: clients must present a certificate it signed (mTLS)"
    )

    @field_validator("cert_file", "client_ca_file")
    @classmethod
    def _check_cert(cls, value: str) -> str:
        return _readable_pem(value, "CERTIFICATE", "certificate")

    @field_validator("key_file")
    @classmethod
    def _check_key(cls, value: str) -> str:
        return _readable_pem(value, "PRIVATE KEY", "private key")

    @model_validator(mode="after")
    def _check_pair(self) -> TLSSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file must be set together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def server_credentials_material(self) -> tuple[bytes, bytes, bytes | None]:
        """(private key, certificate chain, client CA or None), read now."""
        ca = Path(self.client_ca_file).expanduser().read_bytes() if self.client_ca_file else None
        return (
            Path(self.key_file).expanduser().read_bytes(),
            Path(self.cert_file).expanduser().read_bytes(),
            ca,
        )


def _tokens_in_file(path: str) -> list[str]:
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class AuthSettings(_Strict):
    """Bearer-token auth: a call must carry `authorization: Bearer <token>` with one of the
    accepted tokens. The tokens are never configuration values (nor in a config dump)."""

    bearer_env_vars: tuple[str, ...] = Field(
        (), description="names of environment variables, each holding one accepted token"
    )
    bearer_file: str = Field(
        "", description="file with one accepted token per line ('#' comments); read at start"
    )
    public_reflection: bool = Field(
        True,
        description="answer server reflection without a token, like health: it shows the public "
        "contract only, and grpcurl and buf curl ask it before every call",
    )

    @field_validator("bearer_env_vars")
    @classmethod
    def _check_env_vars(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not os.environ.get(name, "").strip():
                raise ValueError(f"environment variable {name} is not set or empty")
        return names

    @field_validator("bearer_file")
    @classmethod
    def _check_file(cls, path: str) -> str:
        if path:
            try:
                tokens = _tokens_in_file(path)
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read {path!r}: {exc}") from None
            if not tokens:
                raise ValueError(f"{path!r} holds no token (one per line)")
        return path

    @property
    def enabled(self) -> bool:
        return bool(self.bearer_env_vars or self.bearer_file)

    def load_tokens(self) -> tuple[bytes, ...]:
        """The accepted tokens, read from the environment and the file now."""
        tokens = [os.environ[name].strip() for name in self.bearer_env_vars]
        if self.bearer_file:
            tokens.extend(_tokens_in_file(self.bearer_file))
        return tuple(dict.fromkeys(t.encode() for t in tokens if t))


_DEFAULT_BACKENDS: dict[str, Any] = {"local": {"kind": "local"}}


_REPLICA_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


class ClusterSettings(_Strict):
    """Replicas that share a stage registry and event logs on Redis (`redis_url`).

    Without `redis_url` the server runs alone, as it always has: CancelStage reaches its
    own stages only, and a dropped stream cancels its stage."""

    redis_url: str = Field(
        "", description="redis:// (or rediss://, unix://) URL of the shared registry; empty: single process"
    )
    replica_id: str = Field(
        "", description="this replica's name in the registry; empty: hostname, process id and a random suffix"
    )
    resume_grace_seconds: float = Field(
        30.0, ge=0, description="seconds a stage whose stream dropped keeps running, waiting for ResumeStage"
    )
    event_log_ttl_seconds: float = Field(
        120.0, gt=0, description="seconds a stage's events stay resumable after it ended"
    )
    event_log_max_events: int = Field(
        10_000, ge=16, description="events of one stage the log keeps (older ones: OUT_OF_RANGE on resume)"
    )
    heartbeat_seconds: float = Field(
        1.0, gt=0, description="seconds between this replica's liveness beats (3 missed: presumed dead)"
    )
    request_timeout: float = Field(
        2.0, gt=0, description="seconds a Redis command or another replica may take to answer"
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{value!r}: must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("replica_id")
    @classmethod
    def _check_replica_id(cls, value: str) -> str:
        if value and not _REPLICA_ID.match(value):
            raise ValueError(f"{value!r}: 1-100 letters, digits, '.', '_', ':' or '-'")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


class _BackendDefaults(PydanticBaseSettingsSource):
    """The default backends, as the lowest source, so that per-key variables
    (`TOOLCHAIN_BACKENDS__VLLM__BASE_URL`, `TOOLCHAIN_BACKENDS__LOCAL__N_CTX`) add a backend
    or change one key of a default one, merged over it, instead of replacing the whole
    table (which dropped `local`, or turned it into an `openai` backend). A table given
    whole (keyword argument, the TOML file's `[backends.*]`, JSON in `TOOLCHAIN_BACKENDS`)
    is the complete set: the defaults are left out."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ answers for the whole source

    def __call__(self) -> dict[str, Any]:
        whole = any(
            "backends" in state
            for name, state in self.settings_sources_data.items()
            if name != "EnvSettingsSource"
        ) or any(key.upper() == f"{ENV_PREFIX}BACKENDS" for key in os.environ)
        return {} if whole else {"backends": _DEFAULT_BACKENDS}


class Settings(BaseSettings):
    """The whole server configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    address: str = Field("127.0.0.1:50051", description="host:port the gRPC server listens on")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes sharing the port (SO_REUSEPORT; `serve --workers`); "
        "more than 1 needs a fixed port",
    )
    default_backend: str = Field("local", description="backend used when a request names none")
    backends: dict[str, BackendSettings] = Field(
        default_factory=lambda: {"local": BackendSettings(kind="local")},
        description="backends by name",
    )
    tool_phase: PhaseDefaults = PhaseDefaults(max_tokens=256, temperature=0.0)
    synthesis_phase: PhaseDefaults = PhaseDefaults(max_tokens=512, temperature=0.7)
    max_tokens_ceiling: int = Field(8192, ge=1, description="largest max_tokens a caller may ask for")
    default_rounds: int = Field(
        1, ge=1, description="tool rounds of a stage whose request sets no max_rounds"
    )
    max_rounds: int = Field(8, ge=1, description="largest max_rounds a caller may ask for")
    max_prompt_chars: int = Field(200_000, ge=1, description="longest system or user prompt")
    max_concurrent_stages: int = Field(2000, ge=1, description="running stages; beyond: RESOURCE_EXHAUSTED")
    admission_max_loop_busy: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="adaptive admission: while stages run and the event loop's thread is at least this "
        "busy (a fraction of wall time, ~0.5 s average), new stages get RESOURCE_EXHAUSTED; 0: off",
    )
    max_buffered_bytes: int = Field(
        256 << 20,
        ge=0,
        description="bytes all streamed stages together may hold between their backends and their "
        "callers (read, not yet written); at the cap a stage reads no more of its backend until "
        "others hand theirs on, and while stages wait a reader that leaves an event unread for 1 s "
        "counts as stalled; "
        "0: no cap",
    )
    max_request_bytes: int = Field(4 << 20, ge=1024, description="largest request message")
    default_deadline_seconds: float = Field(
        300.0, gt=0, description="deadline of a stage whose caller set none"
    )
    max_deadline_seconds: float = Field(
        3600.0, gt=0, description="longest deadline a stage gets; longer caller deadlines are cut"
    )
    stream_stall_seconds: float = Field(
        60.0,
        gt=0,
        description="seconds a stream's event may wait for its reader to read; longer: the stream "
        "ends with RESOURCE_EXHAUSTED (READER_STALLED)",
    )
    shutdown_grace: float = Field(10.0, ge=0, description="seconds running stages get on SIGTERM")
    health_interval: float = Field(
        5.0, gt=0, description="seconds between re-checks of backend readiness for the health service"
    )
    reflection: bool = Field(True, description="serve gRPC server reflection (grpcurl, buf curl)")
    tls: TLSSettings = TLSSettings()
    auth: AuthSettings = AuthSettings()
    metrics_address: str = Field(
        "", description="host:port of the Prometheus /metrics HTTP endpoint; empty: off"
    )
    log_format: Literal["text", "json"] = Field("text", description="text for terminals, json lines")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="root log level")
    log_prompts: bool = Field(False, description="put prompts in the stage log line (debugging only)")
    tracing: bool = Field(False, description="OpenTelemetry spans per stage (needs the otel extra)")
    tools: ToolSettings = ToolSettings()
    cluster: ClusterSettings = ClusterSettings()
    mcp_servers: dict[str, McpServerSettings] = Field(
        {}, description="MCP servers by name, whose tools are offered next to the built-in ones"
    )

    @field_validator("mcp_servers")
    @classmethod
    def _check_mcp_names(cls, servers: dict[str, McpServerSettings]) -> dict[str, McpServerSettings]:
        for name in servers:
            if not _MCP_SERVER_NAME.match(name):
                raise ValueError(f"{name!r}: a server name is 1-64 letters, digits, '_' or '-'")
        return servers

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        return check_host_port(value)

    @field_validator("metrics_address")
    @classmethod
    def _check_metrics_address(cls, value: str) -> str:
        return check_host_port(value) if value else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("tracing")
    @classmethod
    def _check_tracing(cls, value: bool) -> bool:
        if value and not _installed("opentelemetry.trace"):
            raise ValueError("needs OpenTelemetry: pip install 'toolchain-grpc[otel]'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_deadline_within_max(cls, data: Any) -> Any:
        """Setting only max_deadline_seconds below the default deadline lowers the default."""
        if isinstance(data, dict) and "default_deadline_seconds" not in data:
            try:
                longest = float(data["max_deadline_seconds"])
            except (KeyError, TypeError, ValueError):
                return data
            default = cls.model_fields["default_deadline_seconds"].default
            if 0 < longest < default:
                return {**data, "default_deadline_seconds": longest}
        return data

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        if self.default_backend not in self.backends:
            raise ValueError(
                f"default_backend: {self.default_backend!r} is not among backends {sorted(self.backends)}"
            )
        if self.default_deadline_seconds > self.max_deadline_seconds:
            raise ValueError(
                f"default_deadline_seconds: {self.default_deadline_seconds:g} is more than "
                f"max_deadline_seconds {self.max_deadline_seconds:g}"
            )
        return self

    @model_validator(mode="after")
    def _check_workers(self) -> Settings:
        """Several workers share one known port; each gets its own metrics port (+ index)
        and, when one is set, its own replica id (suffix -w<index>)."""
        if self.workers == 1:
            return self
        if int(self.address.rsplit(":", 1)[1]) == 0:
            raise ValueError(
                f"workers: {self.workers} > 1 needs a fixed port in address, not {self.address!r}"
            )
        if self.metrics_address:
            port = int(self.metrics_address.rsplit(":", 1)[1])
            if port and port + self.workers - 1 > 65535:
                raise ValueError(
                    f"metrics_address: port {port} + worker index up to {self.workers - 1} passes 65535"
                )
        last = f"{self.cluster.replica_id}-w{self.workers - 1}"
        if self.cluster.replica_id and not _REPLICA_ID.match(last):
            raise ValueError(f"cluster.replica_id: {last!r} (with the worker suffix) is longer than 100")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_FILE_ENV)
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        sources.append(_BackendDefaults(settings_cls))
        return tuple(sources)


class ConfigError(Exception):
    """Configuration that cannot start a server; the message names the bad keys."""


_VALUE_ERROR = "Value error, "
_SOURCE_FIELD = re.compile(r'field "([^"]+)" from source "(\w+)"')


def _problem(err: Any) -> str:
    key = ".".join(str(p) for p in err["loc"])
    message = str(err["msg"]).removeprefix(_VALUE_ERROR)
    # Cross-field checks start their message with the key they are about.
    return f"{key}: {message}" if key else message


#: TOOLCHAIN_* variables that are not server settings: read by the clients and their
#: examples (address, token, TLS files), the interop harness and the .ci scripts.
NOT_SETTINGS = frozenset(
    {
        CONFIG_FILE_ENV,
        "TOOLCHAIN_ADDR",
        "TOOLCHAIN_TOKEN",
        "TOOLCHAIN_AUTH_ADDR",
        "TOOLCHAIN_TLS_ADDR",
        "TOOLCHAIN_TLS_CA",
        "TOOLCHAIN_TLS_CLIENT_CERT",
        "TOOLCHAIN_TLS_CLIENT_KEY",
        "TOOLCHAIN_FAKE_URL",
        "TOOLCHAIN_LLAMA_CMAKE_ARGS",
        "TOOLCHAIN_SETUP_CODEGEN",
        "TOOLCHAIN_BREAKING_AGAINST",
    }
)


def _setting_variables() -> list[str]:
    """The names a setting's variable can have, less the prefix: TLS, TLS__CERT_FILE, ..."""
    names = []
    for name, info in Settings.model_fields.items():
        names.append(name.upper())
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names.extend(f"{name.upper()}__{sub.upper()}" for sub in model.model_fields)
    return names


def unknown_variables(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """The TOOLCHAIN_* variables that set nothing (a typo is otherwise silently ignored),
    each with the setting it probably meant."""
    fields = {name.upper() for name in Settings.model_fields}
    problems = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        key = name.removeprefix(ENV_PREFIX)
        if key.split("__", 1)[0] in fields:
            continue  # nested keys are checked by the models themselves (extra="forbid")
        near = difflib.get_close_matches(key, _setting_variables(), n=1, cutoff=0.8)
        problems.append(variable + (f" (did you mean {ENV_PREFIX}{near[0]}?)" if near else ""))
    return problems


def load_settings(**overrides: Any) -> Settings:
    """The effective settings, or ConfigError naming every bad key (and every TOOLCHAIN_*
    variable that is no setting)."""
    path = os.environ.get(CONFIG_FILE_ENV)
    if path and not Path(path).is_file():
        raise ConfigError(f"{CONFIG_FILE_ENV}={path}: no such file")
    unknown = unknown_variables(os.environ)
    if unknown:
        raise ConfigError(
            f"invalid configuration: unknown environment variables: {', '.join(unknown)}"
            f" (settings are {ENV_PREFIX}<KEY>, nested keys joined with __)"
        )
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_problem(err) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid configuration: {CONFIG_FILE_ENV}={path}: not valid TOML: {exc}") from None
    except SettingsError as exc:
        match = _SOURCE_FIELD.search(str(exc))
        if match is None:
            raise ConfigError(f"invalid configuration: {exc}") from None
        field = match.group(1)
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        raise ConfigError(
            f"invalid configuration: {field}: the environment variable {ENV_PREFIX}{field.upper()} "
            f"is not valid JSON{cause}"
        ) from None
    if not settings.tools.plugins and not settings.mcp_servers:
        # Only built-in tools can exist: names are checked here, so that --print-config
        # refuses them too. Otherwise they are checked once plugins and servers are loaded.
        from toolchain_service.tools.builtin import BUILTIN_TOOLS  # noqa: PLC0415 - config stays light
        from toolchain_service.tools.catalog import check_enabled  # noqa: PLC0415

        check_enabled(settings.tools.enabled, BUILTIN_TOOLS)
    return settings
