"""Tool plugins: a real package (tests/plugins/toolchain_wordcount, with its own
pyproject.toml) installed by pip into a temporary directory, found through its entry
points (group `toolchain.tools`), listed with its source and executed in a stage; and
every way a plugin can fail stops start-up with one line naming `tools.plugins`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from google.protobuf import json_format
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_service.config import ConfigError, ToolSettings
from toolchain_service.transport.server import RunningServer, start_server

from tests.conftest import make_settings, stage
from tests.fakes.openai_backend import FakeBackend, JSONReply, call, completion
from tests.fakes.server_process import run_serve, serve_env

PLUGIN = Path(__file__).resolve().parent / "plugins" / "toolchain_wordcount"


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin package installed (built by the venv's own setuptools, no network) into
    a directory of its own: on sys.path, its entry points are what importlib.metadata finds."""
    source = tmp_path_factory.mktemp("source") / "toolchain_wordcount"
    shutil.copytree(PLUGIN, source)  # the build writes beside the sources: not in the checkout
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "--no-index", "--target", str(target), str(source)], check=True, timeout=120)
    assert (target / "toolchain_wordcount").is_dir()
    return target


@pytest.fixture
def installed(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(plugin_dir))
    for module in [m for m in sys.modules if m.startswith("toolchain_wordcount")]:
        monkeypatch.delitem(sys.modules, module)
    return plugin_dir


@pytest_asyncio.fixture
async def started(fake: FakeBackend, installed: Path) -> AsyncIterator[RunningServer]:
    tools = ToolSettings(plugins=("wordcount",), weather_url=f"{fake.base_url}/weather-unused")
    server = await start_server(make_settings(fake, tools=tools))
    yield server
    await server.stop(0)


async def test_a_plugin_tool_is_listed_with_its_distribution_and_runs_in_a_stage(
    fake: FakeBackend, started: RunningServer
) -> None:
    import grpc
    from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(started.address) as channel:
        stub = pb_grpc.ToolchainServiceStub(channel)
        listed = {t.name: t for t in (await stub.ListTools(pb.ListToolsRequest(), timeout=10)).tools}
        assert listed["word_count"].source == "plugin:toolchain-wordcount"
        assert listed["word_count"].description == "Count the words of a text."
        assert listed["calculator"].source == "builtin"  # the built-ins stay
        fake.script(JSONReply(completion(tool_calls=[call("word_count", {"text": "one two three"})])))
        response = await stub.RunTools(pb.RunToolsRequest(stage=stage("count")), timeout=30)
        (result,) = response.tool_results
        assert result.outcome == pb.TOOL_OUTCOME_OK, result.error
        assert json_format.MessageToDict(result.result) == {"words": 3}
        specs = [t["function"]["name"] for t in fake.requests[0]["tools"]]
        assert "word_count" in specs


async def test_an_entry_point_may_name_a_tool_class(fake: FakeBackend, installed: Path) -> None:
    tools = ToolSettings(plugins=("wordcount_class",), enabled=("word_count",))
    server = await start_server(make_settings(fake, tools=tools))
    try:
        assert [(t.name, t.source) for t in server.tools.tools()] == [
            ("word_count", "plugin:toolchain-wordcount")
        ]
    finally:
        await server.stop(0)


async def test_installed_plugins_load_only_when_named(fake: FakeBackend, installed: Path) -> None:
    server = await start_server(make_settings(fake))
    try:
        assert "word_count" not in server.tools.names()
    finally:
        await server.stop(0)


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        ("missing", "no entry point 'missing' in the group 'toolchain.tools' is installed; installed: "),
        (
            "broken_import",
            "plugin 'broken_import' (toolchain_wordcount.broken:tools in toolchain-wordcount) did not load:"
            " ModuleNotFoundError: No module named 'toolchain_wordcount_missing_dependency'",
        ),
        (
            "raises",
            "plugin 'raises' (toolchain_wordcount:raises in toolchain-wordcount) raised RuntimeError:"
            " the plugin cannot find its configuration",
        ),
        (
            "not_a_tool",
            "plugin 'not_a_tool' (toolchain_wordcount:not_a_tool in toolchain-wordcount) returned a dict,"
            " not a Tool (or a list of them)",
        ),
        (
            "clash",
            "the tool 'calculator' of the plugin package 'toolchain-wordcount' has the name of a tool of"
            " the built-in",
        ),
    ],
)
async def test_a_plugin_that_fails_stops_start_up_naming_tools_plugins(
    fake: FakeBackend, installed: Path, plugin: str, expected: str
) -> None:
    settings = make_settings(fake, tools=ToolSettings(plugins=(plugin,)))
    with pytest.raises(ConfigError) as caught:
        await start_server(settings)
    message = str(caught.value)
    assert message.startswith(f"invalid configuration: tools.plugins: {expected}"), message
    assert "\n" not in message


async def test_serve_exits_2_with_one_line_when_a_plugin_fails(fake: FakeBackend, installed: Path) -> None:
    env = serve_env(fake, TOOLS__PLUGINS='["wordcount", "raises"]')
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(installed), env.get("PYTHONPATH", "")) if p)
    code, out, err = await run_serve(env)
    assert code == 2, err
    assert out == ""
    assert err.strip().splitlines() == [
        "invalid configuration: tools.plugins: plugin 'raises' (toolchain_wordcount:raises in"
        " toolchain-wordcount) raised RuntimeError: the plugin cannot find its configuration"
    ]
