"""The built-in tools, called directly; get_weather talks to a real local HTTP server."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import ValidationError
from toolchain_service.config import ToolSettings
from toolchain_service.tools.base import ToolFailure
from toolchain_service.tools.builtin import builtin_tools
from toolchain_service.tools.calculator import Calculator, CalculatorArgs
from toolchain_service.tools.current_time import CurrentTime, CurrentTimeArgs
from toolchain_service.tools.weather import CITIES, GetWeather, WeatherArgs

# --- calculator ---------------------------------------------------------------------


async def calculate(expression: str) -> Any:
    result = await Calculator().execute(CalculatorArgs(expression=expression))
    assert result["expression"] == expression
    return result["result"]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("2 ** 10", 1024),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("abs(-5)", 5),
        ("min(3, 1, 2) + max(4, 6)", 7),
        ("floor(-2.5)", -3),
        ("ceil(2.1)", 3),
        ("round(2.6)", 3),
        ("1_000 * 3", 1000 * 3),
    ],
)
async def test_calculator_integer_arithmetic_gives_exact_ints(expression: str, expected: int) -> None:
    result = await calculate(expression)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("7 / 2", 3.5),
        ("0.1 + 0.2", 0.30000000000000004),
        ("sqrt(16)", 4.0),
        ("round(3.14159, 2)", 3.14),
        ("log(8, 2)", 3.0),
        ("log10(1000)", 3.0),
        ("log(e)", 1.0),
        ("exp(0)", 1.0),
        ("sin(pi / 2) + cos(0) + tan(0)", 2.0),
        ("2 * pi", 2 * math.pi),
        ("1.5e3 / 3", 500.0),
        ("2 ** -1", 0.5),
    ],
)
async def test_calculator_float_arithmetic_gives_floats(expression: str, expected: float) -> None:
    result = await calculate(expression)
    assert type(result) is float
    assert result == pytest.approx(expected)


async def test_calculator_allows_the_largest_permitted_integer() -> None:
    assert await calculate("10 ** 300") == 10**300


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "attribute access"),
        ("(1).__class__", "attribute access"),
        ("x + 1", "unknown name 'x'"),
        ("'a' * 3", "string literal"),
        ("True + 1", "bool literal"),
        ("1j * 1j", "complex literal"),
        ("(lambda: 1)()", "lambda"),
        ("[x for x in (1, 2)]", "comprehension"),
        ("1 < 2", "comparison"),
        ("[1, 2][0]", "subscripting"),
        ("sqrt(x=4)", "keyword arguments"),
        ("2 ^ 3", "use ** for powers"),
        ("1; 2", "not a valid expression"),
        ("", "empty expression"),
    ],
)
async def test_calculator_refuses_anything_but_arithmetic(expression: str, message: str) -> None:
    with pytest.raises(ToolFailure, match=re.escape(message)):
        await calculate(expression)


async def test_calculator_refuses_attribute_access() -> None:
    with pytest.raises(ToolFailure, match="unsupported syntax: attribute access"):
        await calculate("math.pi")


async def test_calculator_refuses_dunder_import() -> None:
    with pytest.raises(ToolFailure, match="unsupported function '__import__'"):
        await calculate("__import__('os')")


@pytest.mark.parametrize("expression", ["9 ** 9 ** 9", "2 ** 1001", "2.0 ** 5000", "10 ** -1001"])
async def test_calculator_refuses_huge_exponents(expression: str) -> None:
    with pytest.raises(ToolFailure, match=r"exponent .* is too large"):
        await calculate(expression)


@pytest.mark.parametrize("expression", ["10 ** 301", "(10 ** 300) ** 2", "1e300 * 10", "1e999", "exp(1000)"])
async def test_calculator_refuses_results_beyond_1e300(expression: str) -> None:
    with pytest.raises(ToolFailure, match="too large"):
        await calculate(expression)


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "5 % 0", "0 ** -1", "1.5 / (2 - 2)"])
async def test_calculator_reports_division_by_zero(expression: str) -> None:
    with pytest.raises(ToolFailure, match="division by zero"):
        await calculate(expression)


@pytest.mark.parametrize("expression", ["sqrt(-1)", "log(0)", "log10(-5)"])
async def test_calculator_reports_domain_errors(expression: str) -> None:
    with pytest.raises(ToolFailure, match="math domain error"):
        await calculate(expression)


async def test_calculator_refuses_complex_results() -> None:
    with pytest.raises(ToolFailure, match="not a real number"):
        await calculate("(-8) ** (1 / 3)")


async def test_calculator_refuses_deep_nesting() -> None:
    with pytest.raises(ToolFailure, match="nested too deeply"):
        await calculate("-" * 400 + "1")
    with pytest.raises(ToolFailure, match="not a valid expression"):
        await calculate("(" * 240 + "1" + ")" * 240)


def test_calculator_schema_rejects_extra_keys() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Calculator.Arguments.model_validate_json('{"expression": "1 + 1", "precision": 3}')


def test_calculator_schema_rejects_non_string_expression() -> None:
    with pytest.raises(ValidationError, match="string"):
        Calculator.Arguments.model_validate_json('{"expression": 42}')


def test_calculator_schema_rejects_overlong_expression() -> None:
    with pytest.raises(ValidationError, match="500"):
        Calculator.Arguments.model_validate_json(json.dumps({"expression": "1+" * 300 + "1"}))


def test_calculator_schema_requires_expression() -> None:
    with pytest.raises(ValidationError):
        Calculator.Arguments.model_validate_json("{}")


# --- current_time -------------------------------------------------------------------

# A Monday in winter, so Europe/Paris is on +01:00.
FIXED_NOW = datetime(2024, 1, 15, 12, 34, 56, tzinfo=UTC)


async def test_current_time_in_utc_by_default() -> None:
    result = await CurrentTime(clock=lambda: FIXED_NOW).execute(CurrentTimeArgs())
    assert result == {
        "timezone": "UTC",
        "iso": "2024-01-15T12:34:56+00:00",
        "date": "2024-01-15",
        "time": "12:34:56",
        "weekday": "Monday",
        "utc_offset": "+00:00",
    }


async def test_current_time_in_tokyo_is_nine_hours_ahead() -> None:
    late = datetime(2024, 1, 15, 20, 0, 0, tzinfo=UTC)
    result = await CurrentTime(clock=lambda: late).execute(CurrentTimeArgs(timezone="Asia/Tokyo"))
    assert result["utc_offset"] == "+09:00"
    assert result["iso"] == "2024-01-16T05:00:00+09:00"
    assert result["date"] == "2024-01-16"
    assert result["weekday"] == "Tuesday"


async def test_current_time_reads_the_real_clock() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    result = await CurrentTime().execute(CurrentTimeArgs(timezone="Asia/Tokyo"))
    after = datetime.now(UTC)
    assert result["utc_offset"] == "+09:00"
    assert before <= datetime.fromisoformat(result["iso"]) <= after


async def test_current_time_forgives_case_in_zone_names() -> None:
    result = await CurrentTime(clock=lambda: FIXED_NOW).execute(CurrentTimeArgs(timezone="europe/paris"))
    assert result["timezone"] == "Europe/Paris"
    assert result["utc_offset"] == "+01:00"


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "Europe", "../etc/passwd", "/etc/localtime", "a\x00b"])
async def test_current_time_refuses_unknown_zones(zone: str) -> None:
    with pytest.raises(ToolFailure, match=r"unknown time zone .*use an IANA name such as Europe/Paris"):
        await CurrentTime().execute(CurrentTimeArgs(timezone=zone))


# --- get_weather --------------------------------------------------------------------

OPEN_METEO_BODY: dict[str, Any] = {
    "latitude": 48.86,
    "longitude": 2.3399997,
    "current_units": {"temperature_2m": "°C", "relative_humidity_2m": "%", "wind_speed_10m": "km/h"},
    "current": {
        "time": "2024-01-15T12:30",
        "interval": 900,
        "temperature_2m": 7.4,
        "relative_humidity_2m": 81,
        "wind_speed_10m": 12.6,
        "weather_code": 61,
    },
}


@dataclass
class ForecastServer:
    """What the local forecast server answers, and the queries it received."""

    url: str = ""
    status: int = 200
    body: bytes = json.dumps(OPEN_METEO_BODY).encode()
    content_type: str = "application/json"
    delay: float = 0.0
    queries: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def forecast() -> AsyncIterator[ForecastServer]:
    server = ForecastServer()

    async def handle(request: web.Request) -> web.Response:
        server.queries.append(dict(request.query))
        if server.delay:
            await asyncio.sleep(server.delay)
        return web.Response(status=server.status, body=server.body, content_type=server.content_type)

    app = web.Application()
    app.router.add_get("/v1/forecast", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/v1/forecast"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def weather(forecast: ForecastServer) -> AsyncIterator[GetWeather]:
    tool = GetWeather(forecast.url)
    try:
        yield tool
    finally:
        await tool.aclose()


async def test_get_weather_for_a_city_queries_its_coordinates(
    forecast: ForecastServer, weather: GetWeather
) -> None:
    result = await weather.execute(WeatherArgs(city="paris"))
    assert forecast.queries == [
        {
            "latitude": str(CITIES["Paris"][0]),
            "longitude": str(CITIES["Paris"][1]),
            "current": "temperature_2m,relative_humidity_2m,wind_speed_10m,weather_code",
            "temperature_unit": "celsius",
            "wind_speed_unit": "kmh",
        }
    ]
    assert result == {
        "location": "Paris",
        "latitude": CITIES["Paris"][0],
        "longitude": CITIES["Paris"][1],
        "temperature": 7.4,
        "unit": "celsius",
        "humidity_percent": 81,
        "wind_speed_kmh": 12.6,
        "conditions": "slight rain",
    }


async def test_get_weather_passes_fahrenheit_and_coordinates(
    forecast: ForecastServer, weather: GetWeather
) -> None:
    result = await weather.execute(WeatherArgs(latitude=-33.5, longitude=151.25, unit="fahrenheit"))
    (query,) = forecast.queries
    assert query["latitude"] == "-33.5"
    assert query["longitude"] == "151.25"
    assert query["temperature_unit"] == "fahrenheit"
    assert result["location"] == "-33.5,151.25"
    assert result["unit"] == "fahrenheit"


async def test_get_weather_accepts_city_with_country_suffix(
    forecast: ForecastServer, weather: GetWeather
) -> None:
    result = await weather.execute(WeatherArgs(city="  Tokyo,  Japan "))
    assert result["location"] == "Tokyo"
    assert forecast.queries[0]["latitude"] == str(CITIES["Tokyo"][0])


async def test_get_weather_names_unknown_weather_codes(forecast: ForecastServer, weather: GetWeather) -> None:
    forecast.body = json.dumps({"current": {**OPEN_METEO_BODY["current"], "weather_code": 42}}).encode()
    result = await weather.execute(WeatherArgs(city="Oslo"))
    assert result["conditions"] == "unknown (WMO code 42)"


async def test_get_weather_reports_http_errors(forecast: ForecastServer, weather: GetWeather) -> None:
    forecast.status, forecast.body = 500, b'{"error": true, "reason": "boom"}'
    with pytest.raises(ToolFailure, match="weather service answered HTTP 500"):
        await weather.execute(WeatherArgs(city="London"))


async def test_get_weather_reports_non_json_answers(forecast: ForecastServer, weather: GetWeather) -> None:
    forecast.body, forecast.content_type = b"<html>maintenance</html>", "text/html"
    with pytest.raises(ToolFailure, match="not JSON"):
        await weather.execute(WeatherArgs(city="London"))


@pytest.mark.parametrize(
    "body",
    [
        {"hourly": {}},
        {"current": {"temperature_2m": 3.0}},
        {"current": {**OPEN_METEO_BODY["current"], "temperature_2m": "warm"}},
        [1, 2, 3],
    ],
)
async def test_get_weather_reports_answers_missing_fields(
    forecast: ForecastServer, weather: GetWeather, body: Any
) -> None:
    forecast.body = json.dumps(body).encode()
    with pytest.raises(ToolFailure, match="weather service answer lacks"):
        await weather.execute(WeatherArgs(city="London"))


async def test_get_weather_reports_unknown_cities_without_calling_the_service(
    forecast: ForecastServer, weather: GetWeather
) -> None:
    with pytest.raises(ToolFailure, match=r"unknown city 'Atlantis'.*Amsterdam.*latitude and longitude"):
        await weather.execute(WeatherArgs(city="Atlantis"))
    assert forecast.queries == []


async def test_get_weather_reports_a_slow_service(forecast: ForecastServer) -> None:
    forecast.delay = 2.0
    async with httpx.AsyncClient(timeout=0.2) as client:
        tool = GetWeather(forecast.url, client=client)
        with pytest.raises(ToolFailure, match="did not answer in time"):
            await tool.execute(WeatherArgs(city="Rome"))
        await tool.aclose()
        assert not client.is_closed  # the caller's client stays the caller's


async def test_get_weather_reports_an_unreachable_service() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tool = GetWeather(f"http://127.0.0.1:{port}/v1/forecast")
    try:
        with pytest.raises(ToolFailure, match="unreachable"):
            await tool.execute(WeatherArgs(city="Rome"))
    finally:
        await tool.aclose()


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"latitude": 10.0},
        {"latitude": 91, "longitude": 0},
        {"latitude": 0, "longitude": -181},
        {"city": "Paris", "unit": "kelvin"},
        {"city": 7},
    ],
)
def test_get_weather_schema_rejects_bad_locations(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GetWeather.Arguments.model_validate_json(json.dumps(arguments))


# --- builtin_tools ------------------------------------------------------------------


async def test_builtin_tools_offers_all_three_by_default() -> None:
    tools = builtin_tools(ToolSettings.model_validate({}))
    try:
        assert sorted(tool.name for tool in tools) == ["calculator", "current_time", "get_weather"]
        for tool in tools:
            json.dumps(tool.spec())
    finally:
        for tool in tools:
            await tool.aclose()


def test_builtin_tools_keeps_only_enabled_ones() -> None:
    tools = builtin_tools(ToolSettings.model_validate({"enabled": ["calculator"]}))
    assert [tool.name for tool in tools] == ["calculator"]


def test_builtin_tools_leave_other_names_to_the_catalog_which_refuses_unknown_ones() -> None:
    from toolchain_service.config import ConfigError
    from toolchain_service.tools.catalog import select_tools

    settings = ToolSettings.model_validate({"enabled": ["calculator", "web_search"]})
    tools = builtin_tools(settings)  # web_search may be a plugin's or an MCP server's
    assert [tool.name for tool in tools] == ["calculator"]
    with pytest.raises(ConfigError, match=r"web_search; available: calculator \(plugin tools need"):
        select_tools(settings, [tools])
