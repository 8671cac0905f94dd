"""Typed server configuration (pydantic-settings).

Sources, highest priority first: keyword arguments, environment variables prefixed
`TOOLCHAIN_` (nested keys joined with `__`, e.g. `TOOLCHAIN_BACKENDS__VLLM__BASE_URL`),
then an optional TOML file named by `TOOLCHAIN_CONFIG_FILE`, then the defaults below.
With no configuration at all the server listens on 127.0.0.1:50051 and serves the
embedded local model. API keys are never configuration values: a backend names the
environment variable that holds its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "TOOLCHAIN_CONFIG_FILE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendSettings(_Strict):
    """One named model backend."""

    kind: Literal["openai", "local"] = Field(
        "openai", description="openai: any OpenAI-compatible HTTP server; local: llama.cpp in-process"
    )
    base_url: str = Field("", description="chat-completions base URL, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field("", description="name of the environment variable holding the API key")
    default_model: str = Field("", description="model used when a request names none")
    models: tuple[str, ...] = Field((), description="models callers may request; empty: any")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to open a connection")
    read_timeout: float = Field(60.0, gt=0, description="seconds the backend may stay silent")
    request_timeout: float = Field(300.0, gt=0, description="seconds one backend call may take")
    max_retries: int = Field(2, ge=0, le=10, description="retries of transient failures before output")
    max_connections: int = Field(256, ge=1, description="HTTP connection pool size")
    max_response_bytes: int = Field(8 << 20, ge=1024, description="largest body or SSE event accepted")
    extra_body: dict[str, Any] = Field({}, description="extra JSON fields sent with every request")
    num_predict_option: bool = Field(False, description="also send options.num_predict (Ollama)")
    streams_tool_calls: bool | None = Field(
        None, description="whether a streamed tool_choice=auto works; unset: the kind's default"
    )
    model_path: str = Field("", description="local: GGUF file; empty: the bundled SmolLM2-135M-Instruct")
    n_ctx: int = Field(2048, ge=256, description="local: context window in tokens")
    n_threads: int = Field(0, ge=0, description="local: CPU threads; 0: all cores")
    chat_format: str = Field("chatml-function-calling", description="local: llama.cpp chat format")

    @model_validator(mode="after")
    def _check_kind(self) -> BackendSettings:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai backend needs base_url")
        return self

    def api_key(self) -> str:
        """The key from the environment; many local servers accept any non-empty key."""
        return os.environ.get(self.api_key_env, "") if self.api_key_env else "unused"


class PhaseDefaults(_Strict):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0, le=2.0)


class ToolSettings(_Strict):
    enabled: tuple[str, ...] = Field((), description="tools offered; empty: all built-in tools")
    timeout: float = Field(10.0, gt=0, description="seconds a tool call may run")
    max_calls_per_stage: int = Field(16, ge=1, description="tool calls executed per stage; more: SKIPPED")
    max_result_bytes: int = Field(64 << 10, ge=256, description="largest JSON result kept per call")
    weather_url: str = Field(
        "https://api.open-meteo.com/v1/forecast",
        description="get_weather: Open-Meteo-compatible forecast API",
    )


class Settings(BaseSettings):
    """The whole server configuration."""

    model_config = SettingsConfigDict(
        env_prefix="TOOLCHAIN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    address: str = Field("127.0.0.1:50051", description="host:port the gRPC server listens on")
    default_backend: str = Field("local", description="backend used when a request names none")
    backends: dict[str, BackendSettings] = Field(
        default_factory=lambda: {"local": BackendSettings(kind="local")},
        description="backends by name",
    )
    tool_phase: PhaseDefaults = PhaseDefaults(max_tokens=256, temperature=0.0)
    synthesis_phase: PhaseDefaults = PhaseDefaults(max_tokens=512, temperature=0.7)
    max_tokens_ceiling: int = Field(8192, ge=1, description="largest max_tokens a caller may ask for")
    max_prompt_chars: int = Field(200_000, ge=1, description="longest system or user prompt")
    max_concurrent_stages: int = Field(2000, ge=1, description="running stages; beyond: RESOURCE_EXHAUSTED")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="largest request message")
    shutdown_grace: float = Field(10.0, ge=0, description="seconds running stages get on SIGTERM")
    tools: ToolSettings = ToolSettings()

    @model_validator(mode="after")
    def _check_default_backend(self) -> Settings:
        if self.default_backend not in self.backends:
            raise ValueError(
                f"default_backend {self.default_backend!r} is not among backends {sorted(self.backends)}"
            )
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
        return tuple(sources)


class ConfigError(Exception):
    """Configuration that cannot start a server; the message names the bad keys."""


def load_settings(**overrides: Any) -> Settings:
    path = os.environ.get(CONFIG_FILE_ENV)
    if path and not Path(path).is_file():
        raise ConfigError(f"{CONFIG_FILE_ENV}={path}: no such file")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
