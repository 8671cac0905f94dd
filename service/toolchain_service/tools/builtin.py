"""The tools that ship with the server, built from `ToolSettings`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolchain_service.config import ToolSettings
from toolchain_service.tools.base import Tool
from toolchain_service.tools.calculator import Calculator
from toolchain_service.tools.current_time import CurrentTime
from toolchain_service.tools.weather import GetWeather

#: The built-in tools' names.
BUILTIN_TOOLS: tuple[str, ...] = (Calculator.name, CurrentTime.name, GetWeather.name)


def builtin_tools(settings: ToolSettings) -> list[Tool[Any]]:
    """The built-in tools named in `settings.enabled`, or all of them when it is empty.
    Other names are left to the other sources (plugins, MCP servers): the catalog
    (`tools/catalog.py`) reports a name that no source has."""
    # Factories rather than instances: a disabled get_weather must not open an HTTP client.
    factories: dict[str, Callable[[], Tool[Any]]] = {
        Calculator.name: Calculator,
        CurrentTime.name: CurrentTime,
        GetWeather.name: lambda: GetWeather(settings.weather_url),
    }
    names = [name for name in settings.enabled if name in factories] if settings.enabled else factories
    return [factories[name]() for name in dict.fromkeys(names)]
