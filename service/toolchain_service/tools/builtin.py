"""The tools that ship with the server, built from `ToolSettings`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolchain_service.config import ToolSettings
from toolchain_service.tools.base import Tool
from toolchain_service.tools.calculator import Calculator
from toolchain_service.tools.current_time import CurrentTime
from toolchain_service.tools.weather import GetWeather


def builtin_tools(settings: ToolSettings) -> list[Tool[Any]]:
    """The built-in tools named in `settings.enabled`, or all of them when it is empty.
    Raises ValueError naming any unknown tool, so a typo fails at startup."""
    # Factories rather than instances: a disabled get_weather must not open an HTTP client.
    factories: dict[str, Callable[[], Tool[Any]]] = {
        Calculator.name: Calculator,
        CurrentTime.name: CurrentTime,
        GetWeather.name: lambda: GetWeather(settings.weather_url),
    }
    unknown = [name for name in settings.enabled if name not in factories]
    if unknown:
        raise ValueError(
            f"unknown tools in tools.enabled: {', '.join(unknown)}; available: {', '.join(factories)}"
        )
    names = settings.enabled or tuple(factories)
    return [factories[name]() for name in dict.fromkeys(names)]
