"""Configuration that says what is wrong: per-key environment variables merge into the
backends instead of replacing them, a TOOLCHAIN_* variable that sets nothing is refused,
unknown tools in tools.enabled and bad MCP server entries are named, and `serve` stops
with exit code 2 and one line for each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from toolchain_service.config import CONFIG_FILE_ENV, ConfigError, load_settings

from tests.fakes.openai_backend import FakeBackend
from tests.fakes.server_process import run_serve, serve_env


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TOOLCHAIN_* variable of the developer's shell leaks into these tests."""
    for name in [n for n in os.environ if n.startswith("TOOLCHAIN_")]:
        monkeypatch.delenv(name)


def config_error() -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return str(caught.value)


# --- per-key variables and the default backends -------------------------------------


def test_a_per_key_variable_adds_a_backend_and_the_default_local_one_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__VLLM__BASE_URL", "http://vllm.internal:8000/v1")
    settings = load_settings()
    assert {name: b.kind for name, b in settings.backends.items()} == {"local": "local", "vllm": "openai"}
    assert settings.backends["vllm"].base_url == "http://vllm.internal:8000/v1"
    assert settings.default_backend == "local"


def test_a_per_key_variable_changes_one_key_of_the_local_backend_and_keeps_its_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__LOCAL__N_CTX", "4096")
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__LOCAL__PARALLEL", "2")
    (name, local), *others = load_settings().backends.items()
    assert (name, local.kind, local.n_ctx, local.parallel, others) == ("local", "local", 4096, 2, [])


def test_a_base_url_on_the_local_backend_is_refused_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__LOCAL__BASE_URL", "http://127.0.0.1:8000/v1")
    assert "backends.local.base_url: a local backend runs its own model process" in config_error()


def test_a_whole_table_replaces_the_defaults_and_per_key_variables_merge_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "toolchain.toml"
    path.write_text('default_backend = "vllm"\n[backends.vllm]\nbase_url = "http://vllm:8000/v1"\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(path))
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__VLLM__MAX_RETRIES", "5")
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__OLLAMA__BASE_URL", "http://127.0.0.1:11434/v1")
    backends = load_settings().backends
    assert sorted(backends) == ["ollama", "vllm"]  # the file's table is the whole set
    assert backends["vllm"].base_url == "http://vllm:8000/v1" and backends["vllm"].max_retries == 5

    monkeypatch.delenv(CONFIG_FILE_ENV)
    monkeypatch.setenv("TOOLCHAIN_DEFAULT_BACKEND", "vllm")
    monkeypatch.setenv("TOOLCHAIN_BACKENDS", json.dumps({"vllm": {"base_url": "http://json:8000/v1"}}))
    backends = load_settings().backends
    assert sorted(backends) == ["ollama", "vllm"] and backends["vllm"].max_retries == 5


# --- TOOLCHAIN_* variables that set nothing ---------------------------------------


def test_an_unknown_toolchain_variable_is_named_with_the_setting_it_probably_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOOLCHAIN_ADRESS", "127.0.0.1:1")
    monkeypatch.setenv("TOOLCHAIN_TLS_CERT_FILE", "/x.pem")
    monkeypatch.setenv("TOOLCHAIN_WHATEVER", "1")
    message = config_error()
    assert message.startswith("invalid configuration: unknown environment variables: ")
    assert "TOOLCHAIN_ADRESS (did you mean TOOLCHAIN_ADDRESS?)" in message
    assert "TOOLCHAIN_TLS_CERT_FILE (did you mean TOOLCHAIN_TLS__CERT_FILE?)" in message
    assert "TOOLCHAIN_WHATEVER (settings are" in message  # nothing close: no guess


def test_the_clients_own_toolchain_variables_are_not_settings_and_are_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TOOLCHAIN_TOKEN", "TOOLCHAIN_ADDR", "TOOLCHAIN_TLS_CA", "TOOLCHAIN_SETUP_CODEGEN"):
        monkeypatch.setenv(name, "x")
    load_settings()


def test_an_unknown_nested_key_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLCHAIN_TOOLS__ENABLE", '["calculator"]')
    assert "tools.enable: Extra inputs are not permitted" in config_error()


# --- tools and MCP servers --------------------------------------------------------


def test_an_unknown_tool_in_tools_enabled_is_named_with_the_tools_that_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOOLCHAIN_TOOLS__ENABLED", '["calculator", "word_count"]')
    assert config_error() == (
        "invalid configuration: tools.enabled: unknown tools: word_count; available: calculator,"
        " current_time, get_weather (plugin tools need tools.plugins, MCP tools mcp_servers)"
    )


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({}, "mcp_servers.x: set either command (stdio) or url (streamable HTTP)"),
        ({"command": "a", "url": "http://b/mcp"}, "mcp_servers.x: set either command"),
        ({"url": "ftp://b/mcp"}, "mcp_servers.x.url: must start with http:// or https://"),
        ({"url": "http://b/mcp", "args": ["-v"]}, "args: only for a command (stdio) server"),
        ({"command": "a", "headers_env": {"Authorization": "PATH"}}, "headers_env: only for a url"),
        (
            {"url": "http://b/mcp", "headers_env": {"Authorization": "TOOLCHAIN_TEST_NO_SUCH_VAR"}},
            "mcp_servers.x.headers_env: environment variable TOOLCHAIN_TEST_NO_SUCH_VAR is not set",
        ),
        (
            {"url": "http://b/mcp", "headers_env": {"Bad Header": "PATH"}},
            "'Bad Header' is not an HTTP header",
        ),
        ({"command": "a", "env_vars": ["TOOLCHAIN_TEST_NO_SUCH_VAR"]}, "mcp_servers.x.env_vars: environment"),
        ({"command": "a", "timeout": 0}, "mcp_servers.x.timeout: Input should be greater than 0"),
    ],
)
def test_a_bad_mcp_server_entry_names_its_key(server: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(mcp_servers={"x": server})
    assert expected in str(caught.value), str(caught.value)


def test_an_mcp_server_name_must_fit_a_health_service_name() -> None:
    with pytest.raises(ConfigError, match=r"mcp_servers: 'a b': a server name is 1-64 letters"):
        load_settings(mcp_servers={"a b": {"command": "x"}})


# --- serve: exit code 2 and one line --------------------------------------------------


@pytest.mark.parametrize("print_config", [False, True], ids=["serve", "print-config"])
async def test_serve_exits_2_with_one_line_for_an_unknown_tool(fake: FakeBackend, print_config: bool) -> None:
    env = serve_env(fake, TOOLS__ENABLED='["word_count"]')
    code, out, err = await run_serve(env, *(["--print-config"] if print_config else []))
    assert code == 2, err
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("invalid configuration: tools.enabled: unknown tools: word_count; available: ")


async def test_serve_exits_2_with_one_line_for_an_unknown_variable(fake: FakeBackend) -> None:
    env = serve_env(fake, MAX_CONCURENT_STAGES="5")
    code, _, err = await run_serve(env)
    assert code == 2, err
    assert err.strip().splitlines() == [
        "invalid configuration: unknown environment variables: TOOLCHAIN_MAX_CONCURENT_STAGES (did you"
        " mean TOOLCHAIN_MAX_CONCURRENT_STAGES?) (settings are TOOLCHAIN_<KEY>, nested keys joined with __)"
    ]


async def test_print_config_shows_a_backend_added_by_a_per_key_variable_next_to_local(
    fake: FakeBackend,
) -> None:
    env = serve_env(fake)
    del env["TOOLCHAIN_BACKENDS"], env["TOOLCHAIN_DEFAULT_BACKEND"]
    env["TOOLCHAIN_BACKENDS__VLLM__BASE_URL"] = fake.base_url
    code, out, err = await run_serve(env, "--print-config")
    assert code == 0, err
    backends = json.loads(out)["backends"]
    assert backends["local"]["kind"] == "local" and backends["vllm"]["kind"] == "openai"
