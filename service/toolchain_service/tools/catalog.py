"""The tools a server offers, from every source, checked as one set.

    built-in (tools/builtin.py) ─┐
    plugins (tools/plugins.py)  ─┼─▶ no two tools alike, every name in tools.enabled known
    MCP servers (tools/mcp.py)  ─┘        ─▶ the enabled ones ─▶ ToolRegistry

A mistake stops start-up with one `ConfigError` that names the key to change: the MCP
server or plugin whose tool takes a name already taken (built-ins first, then plugins in
`tools.plugins` order, then MCP servers in configuration order), or `tools.enabled`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from toolchain_service.config import ConfigError, ToolSettings
from toolchain_service.tools.base import Tool


def check_enabled(enabled: Iterable[str], available: Iterable[str]) -> None:
    """ConfigError naming the names in `enabled` that no tool has."""
    names = sorted(set(available))
    unknown = [name for name in dict.fromkeys(enabled) if name not in names]
    if unknown:
        raise ConfigError(
            f"invalid configuration: tools.enabled: unknown tools: {', '.join(unknown)};"
            f" available: {', '.join(names) or 'none'} (plugin tools need tools.plugins,"
            " MCP tools mcp_servers)"
        )


def _key(source: str) -> str:
    kind, _, name = source.partition(":")
    if kind == "mcp":
        return f"mcp_servers.{name}"
    if kind == "plugin":
        return "tools.plugins"
    return "tools"


def _describe(source: str) -> str:
    kind, _, name = source.partition(":")
    return {"mcp": f"MCP server {name!r}", "plugin": f"plugin package {name!r}"}.get(kind, "built-in")


def select_tools(settings: ToolSettings, sources: Sequence[Sequence[Tool[Any]]]) -> list[Tool[Any]]:
    """The tools to offer: every source's, in order, checked; those in `tools.enabled`
    only, when it names any."""
    seen: dict[str, Tool[Any]] = {}
    for tools in sources:
        for tool in tools:
            taken = seen.get(tool.name)
            if taken is not None:
                key = _key(tool.source)
                hint = f"; set {key}.tool_prefix to keep them apart" if tool.source.startswith("mcp:") else ""
                raise ConfigError(
                    f"invalid configuration: {key}: the tool {tool.name!r} of the {_describe(tool.source)}"
                    f" has the name of a tool of the {_describe(taken.source)}{hint}"
                )
            seen[tool.name] = tool
    check_enabled(settings.enabled, seen)
    if not settings.enabled:
        return list(seen.values())
    return [seen[name] for name in dict.fromkeys(settings.enabled)]
