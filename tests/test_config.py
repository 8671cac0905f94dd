"""Typed configuration: every source, one clear message naming each bad key, `serve`
stopping with exit code 2 on bad configuration, and `serve --print-config` without secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from toolchain_service.config import CONFIG_FILE_ENV, ConfigError, Settings, load_settings

from tests.fakes.openai_backend import FakeBackend
from tests.fakes.pki import make_pki
from tests.fakes.server_process import run_serve, serve_env

SECRET = "s3cret-token-value-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TOOLCHAIN_* variable of the developer's shell leaks into these tests."""
    import os

    for name in [n for n in os.environ if n.startswith("TOOLCHAIN_")]:
        monkeypatch.delenv(name)


def toml_file(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "toolchain.toml"
    path.write_text(text)
    monkeypatch.setenv(CONFIG_FILE_ENV, str(path))
    return path


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    return str(caught.value)


def test_defaults_need_no_configuration() -> None:
    settings = load_settings()
    assert settings.address == "127.0.0.1:50051"
    assert settings.reflection is True and settings.metrics_address == ""
    assert not settings.tls.enabled and not settings.auth.enabled
    assert settings.log_format == "text" and settings.log_prompts is False
    assert settings.default_deadline_seconds <= settings.max_deadline_seconds


def test_toml_file_and_environment_combine_with_the_environment_winning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml_file(
        tmp_path,
        """
address = "127.0.0.1:6000"
default_backend = "vllm"
metrics_address = "127.0.0.1:9464"
log_format = "json"
max_deadline_seconds = 120

[backends.vllm]
base_url = "http://vllm.internal:8000/v1"
default_model = "qwen"
""",
        monkeypatch,
    )
    monkeypatch.setenv("TOOLCHAIN_ADDRESS", "127.0.0.1:7000")
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__VLLM__MAX_RETRIES", "5")
    monkeypatch.setenv("TOOLCHAIN_REFLECTION", "false")
    settings = load_settings()
    assert settings.address == "127.0.0.1:7000"
    assert settings.backends["vllm"].base_url == "http://vllm.internal:8000/v1"
    assert settings.backends["vllm"].max_retries == 5
    assert settings.metrics_address == "127.0.0.1:9464" and settings.log_format == "json"
    assert settings.max_deadline_seconds == 120 and settings.reflection is False
    assert settings.default_deadline_seconds == 120  # lowered to the maximum


def test_backends_as_json_in_one_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLCHAIN_DEFAULT_BACKEND", "fake")
    monkeypatch.setenv(
        "TOOLCHAIN_BACKENDS", '{"fake": {"base_url": "http://127.0.0.1:9/v1", "default_model": "fake-model"}}'
    )
    settings = load_settings()
    assert settings.backends["fake"].default_model == "fake-model"


def test_bad_values_in_a_toml_file_name_each_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml_file(
        tmp_path,
        """
max_concurrent_stages = 0
log_format = "xml"
no_such_setting = 1
[backends.x]
kind = "openai"
""",
        monkeypatch,
    )
    message = config_error()
    assert message.startswith("invalid configuration: ")
    assert "backends.x.base_url: an openai backend needs base_url" in message
    assert "max_concurrent_stages: Input should be greater than or equal to 1" in message
    assert "log_format: " in message
    assert "no_such_setting: Extra inputs are not permitted" in message


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml_file(tmp_path, "address = \n", monkeypatch)
    message = config_error()
    assert f"{CONFIG_FILE_ENV}={path}: not valid TOML" in message and "line 1" in message


def test_missing_config_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "absent.toml"))
    assert config_error() == f"{CONFIG_FILE_ENV}={tmp_path / 'absent.toml'}: no such file"


def test_invalid_json_in_an_environment_variable_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLCHAIN_BACKENDS", '{"fake": ')
    assert "backends: the environment variable TOOLCHAIN_BACKENDS is not valid JSON" in config_error()


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLCHAIN_BACKENDS__LOCAL__MAX_RETRIES", "many")
    assert "backends.local.max_retries: Input should be a valid integer" in config_error()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"address": "localhost"}, "address: must be host:port"),
        ({"address": "127.0.0.1:70000"}, "address: must be host:port"),
        ({"metrics_address": "9464"}, "metrics_address: must be host:port"),
        ({"default_backend": "nope"}, "default_backend: 'nope' is not among backends ['local']"),
        (
            {"default_deadline_seconds": 100, "max_deadline_seconds": 10},
            "default_deadline_seconds: 100 is more than max_deadline_seconds 10",
        ),
        ({"max_deadline_seconds": 0}, "max_deadline_seconds: Input should be greater than 0"),
        ({"log_level": "LOUD"}, "log_level: "),
        ({"auth": {"bearer_env_vars": ["TOOLCHAIN_TEST_UNSET_TOKEN"]}}, "auth.bearer_env_vars: environment"),
        ({"auth": {"bearer_file": "/nonexistent/tokens"}}, "auth.bearer_file: cannot read"),
        ({"tls": {"cert_file": "/nonexistent/server.crt"}}, "tls.cert_file: cannot read"),
    ],
)
def test_invalid_settings_name_the_bad_key(overrides: dict[str, object], expected: str) -> None:
    assert expected in config_error(**overrides)


def test_tls_files_are_checked_as_a_pair_and_as_pem(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    assert "must be set together" in config_error(tls={"cert_file": str(pki.server.cert_file)})
    assert "tls.key_file: " in config_error(
        tls={"cert_file": str(pki.server.cert_file), "key_file": str(pki.server.cert_file)}
    )
    assert "needs tls.cert_file" in config_error(tls={"client_ca_file": str(pki.ca_file)})
    settings = load_settings(
        tls={
            "cert_file": str(pki.server.cert_file),
            "key_file": str(pki.server.key_file),
            "client_ca_file": str(pki.ca_file),
        }
    )
    assert settings.tls.enabled


def test_bearer_tokens_are_read_from_environment_and_file_but_never_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_TOOLCHAIN_TOKEN", SECRET)
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated 2026-01\nfile-token-1\n\n  file-token-2  \n")
    settings = load_settings(auth={"bearer_env_vars": ["TEST_TOOLCHAIN_TOKEN"], "bearer_file": str(tokens)})
    assert settings.auth.load_tokens() == (SECRET.encode(), b"file-token-1", b"file-token-2")
    dump = settings.model_dump_json()
    assert SECRET not in dump and "file-token" not in dump
    assert SECRET not in repr(settings)


def test_empty_bearer_file_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing yet\n")
    assert "auth.bearer_file: " in config_error(auth={"bearer_file": str(empty)})
    assert "holds no token" in config_error(auth={"bearer_file": str(empty)})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.reflection = False  # type: ignore[misc]


async def test_serve_with_bad_configuration_exits_2_with_one_message_naming_the_key() -> None:
    env = serve_env(
        DEFAULT_BACKEND="x",
        BACKENDS=json.dumps({"x": {"kind": "openai", "default_model": "m"}}),
        MAX_CONCURRENT_STAGES="-1",
    )
    code, out, err = await run_serve(env)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("invalid configuration: ")
    assert "backends.x.base_url: an openai backend needs base_url" in lines[0]
    assert "max_concurrent_stages: Input should be greater than or equal to 1" in lines[0]


@pytest.mark.parametrize("problem", ["missing", "unreadable", "not-gguf"])
async def test_serve_exits_2_with_one_line_when_the_local_model_path_is_bad(
    tmp_path: Path, problem: str
) -> None:
    path = tmp_path / "model.gguf"
    if problem == "unreadable":
        path.mkdir()  # a directory: opening it fails even as root
    elif problem == "not-gguf":
        path.write_bytes(b"not a model")
    code, out, err = await run_serve(
        serve_env(BACKENDS=json.dumps({"local": {"kind": "local", "model_path": str(path)}}))
    )
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("invalid configuration: backends.local.model_path: "), lines[0]
    assert str(path) in lines[0]


async def test_serve_exits_2_when_the_llama_server_binary_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-llama-server"
    code, _, err = await run_serve(
        serve_env(BACKENDS=json.dumps({"local": {"kind": "local", "server_binary": str(missing)}}))
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"backends.local.server_binary: {str(missing)!r} is not a file" in err


async def test_serve_exits_2_with_one_line_when_the_model_process_cannot_start() -> None:
    local = {"kind": "local", "server_binary": "/bin/false"}  # a file, so only starting it fails
    code, out, err = await run_serve(serve_env(BACKENDS=json.dumps({"local": local})), timeout=60)
    assert code == 2, err
    assert out == ""
    expected = "backends.local: the embedded model did not start: the model process exited with status 1"
    assert err.strip().splitlines() == [f"{expected} while starting"], err


async def test_serve_with_a_bad_toml_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[backends.local]\nkind = "gguf"\n')
    code, _, err = await run_serve(serve_env(), "--config", str(path))
    assert code == 2
    assert "backends.local.kind: Input should be 'openai' or 'local'" in err
    assert "Traceback" not in err


async def test_serve_exits_2_when_the_address_is_taken(fake: FakeBackend) -> None:
    port = fake.port  # the fake backend already listens there
    code, _, err = await run_serve(serve_env(fake, ADDRESS=f"127.0.0.1:{port}"))
    assert code == 2
    assert f"address: cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


async def test_print_config_shows_the_effective_configuration_without_secrets(
    tmp_path: Path, fake: FakeBackend
) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens"
    tokens.write_text("file-secret-token-value\n")
    config = tmp_path / "toolchain.toml"
    config.write_text(
        f"""
metrics_address = "127.0.0.1:9464"
log_format = "json"
[tls]
cert_file = "{pki.server.cert_file}"
key_file = "{pki.server.key_file}"
[auth]
bearer_env_vars = ["TEST_TOOLCHAIN_TOKEN"]
bearer_file = "{tokens}"
"""
    )
    env = serve_env(fake, SHUTDOWN_GRACE="3")
    env["TEST_TOOLCHAIN_TOKEN"] = SECRET
    code, out, err = await run_serve(env, "--config", str(config), "--print-config")
    assert code == 0, err
    assert SECRET not in out and "file-secret-token-value" not in out
    assert "PRIVATE KEY" not in out
    shown = json.loads(out)
    assert shown["address"] == "127.0.0.1:0"  # from the environment
    assert shown["shutdown_grace"] == 3.0
    assert shown["default_backend"] == "fake"
    assert shown["backends"]["fake"]["base_url"] == fake.base_url
    assert shown["metrics_address"] == "127.0.0.1:9464" and shown["log_format"] == "json"
    assert shown["auth"]["bearer_env_vars"] == ["TEST_TOOLCHAIN_TOKEN"]  # names, not tokens
    assert shown["tls"]["cert_file"] == str(pki.server.cert_file)
    assert shown["reflection"] is True
    assert shown["default_deadline_seconds"] == 300.0 and shown["max_deadline_seconds"] == 3600.0
