"""get_weather: current conditions from an Open-Meteo-compatible forecast API.

Cities are resolved from a small built-in table rather than a geocoding service, so a
call costs one upstream request and a misspelt city fails fast with a useful message.
Every upstream problem becomes a ToolFailure; httpx exceptions never leave the tool.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, Self

import httpx
from pydantic import Field, model_validator

from toolchain_service.tools.base import JSONValue, Tool, ToolArguments, ToolFailure

#: Seconds for the whole upstream exchange when the tool creates its own client.
DEFAULT_TIMEOUT = 5.0
#: A current-conditions answer is well under 1 KiB; a much larger one is not that.
MAX_RESPONSE_BYTES = 256 << 10

CITIES: dict[str, tuple[float, float]] = {
    "Amsterdam": (52.3676, 4.9041),
    "Athens": (37.9838, 23.7275),
    "Auckland": (-36.8485, 174.7633),
    "Bangkok": (13.7563, 100.5018),
    "Beijing": (39.9042, 116.4074),
    "Berlin": (52.5200, 13.4050),
    "Buenos Aires": (-34.6037, -58.3816),
    "Cairo": (30.0444, 31.2357),
    "Cape Town": (-33.9249, 18.4241),
    "Chicago": (41.8781, -87.6298),
    "Delhi": (28.7041, 77.1025),
    "Dubai": (25.2048, 55.2708),
    "Dublin": (53.3498, -6.2603),
    "Hong Kong": (22.3193, 114.1694),
    "Istanbul": (41.0082, 28.9784),
    "Jakarta": (-6.2088, 106.8456),
    "Johannesburg": (-26.2041, 28.0473),
    "Lagos": (6.5244, 3.3792),
    "Lima": (-12.0464, -77.0428),
    "Lisbon": (38.7223, -9.1393),
    "London": (51.5074, -0.1278),
    "Los Angeles": (34.0522, -118.2437),
    "Madrid": (40.4168, -3.7038),
    "Mexico City": (19.4326, -99.1332),
    "Moscow": (55.7558, 37.6173),
    "Mumbai": (19.0760, 72.8777),
    "Nairobi": (-1.2921, 36.8219),
    "New York": (40.7128, -74.0060),
    "Oslo": (59.9139, 10.7522),
    "Paris": (48.8566, 2.3522),
    "Rome": (41.9028, 12.4964),
    "San Francisco": (37.7749, -122.4194),
    "Santiago": (-33.4489, -70.6693),
    "Sao Paulo": (-23.5505, -46.6333),
    "Seoul": (37.5665, 126.9780),
    "Shanghai": (31.2304, 121.4737),
    "Singapore": (1.3521, 103.8198),
    "Stockholm": (59.3293, 18.0686),
    "Sydney": (-33.8688, 151.2093),
    "Tokyo": (35.6762, 139.6503),
    "Toronto": (43.6532, -79.3832),
    "Vienna": (48.2082, 16.3738),
    "Warsaw": (52.2297, 21.0122),
    "Zurich": (47.3769, 8.5417),
}

_CITY_KEYS: dict[str, str] = {name.casefold(): name for name in CITIES}
_CITY_KEYS.update({"new york city": "New York", "nyc": "New York", "são paulo": "Sao Paulo"})

#: WMO weather interpretation codes as Open-Meteo documents them.
WMO_CODES: dict[int, str] = {
    0: "clear sky",
    1: "mainly clear",
    2: "partly cloudy",
    3: "overcast",
    45: "fog",
    48: "depositing rime fog",
    51: "light drizzle",
    53: "moderate drizzle",
    55: "dense drizzle",
    56: "light freezing drizzle",
    57: "dense freezing drizzle",
    61: "slight rain",
    63: "moderate rain",
    65: "heavy rain",
    66: "light freezing rain",
    67: "heavy freezing rain",
    71: "slight snow fall",
    73: "moderate snow fall",
    75: "heavy snow fall",
    77: "snow grains",
    80: "slight rain showers",
    81: "moderate rain showers",
    82: "violent rain showers",
    85: "slight snow showers",
    86: "heavy snow showers",
    95: "thunderstorm",
    96: "thunderstorm with slight hail",
    99: "thunderstorm with heavy hail",
}

_CURRENT_FIELDS = ("temperature_2m", "relative_humidity_2m", "wind_speed_10m", "weather_code")


class WeatherArgs(ToolArguments):
    city: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="major city name, e.g. 'Paris' or 'Tokyo'; for other places give latitude and longitude",
        examples=["Paris"],
    )
    latitude: float | None = Field(default=None, ge=-90, le=90, description="degrees north, -90 to 90")
    longitude: float | None = Field(default=None, ge=-180, le=180, description="degrees east, -180 to 180")
    unit: Literal["celsius", "fahrenheit"] = Field(default="celsius", description="temperature unit")

    @model_validator(mode="after")
    def _check_location(self) -> Self:
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("latitude and longitude must be given together")
        if self.city is None and self.latitude is None:
            raise ValueError("give a city, or latitude and longitude")
        return self


def find_city(name: str) -> tuple[str, float, float]:
    """The table's spelling and coordinates of `name`, forgiving case and a trailing
    ", Country"; ToolFailure when the table does not know it."""
    folded = " ".join(name.split()).casefold()
    canonical = _CITY_KEYS.get(folded) or _CITY_KEYS.get(folded.split(",", 1)[0].strip())
    if canonical is None:
        examples = ", ".join(list(CITIES)[::6])
        raise ToolFailure(
            f"unknown city {name!r}; known cities include {examples}. "
            "For other places give latitude and longitude instead."
        )
    latitude, longitude = CITIES[canonical]
    return canonical, latitude, longitude


def _number(current: dict[str, object], key: str) -> float:
    value = current.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ToolFailure(f"weather service answer lacks a numeric current.{key}")
    return value


class GetWeather(Tool[WeatherArgs]):
    name = "get_weather"
    description = (
        "Get the current weather (temperature, humidity, wind, conditions) for a major city "
        "or for a latitude/longitude."
    )
    Arguments = WeatherArgs
    example = ("How is the weather in Madrid?", {"city": "Madrid"})

    def __init__(self, url: str, client: httpx.AsyncClient | None = None) -> None:
        """`url` is the forecast endpoint; a given `client` stays the caller's to close."""
        self._url = url
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)

    def grammar_schema(self) -> dict[str, Any] | None:
        """A city, or latitude and longitude together (whole degrees: a grammar cannot
        bound a fraction), and optionally the unit."""
        unit = {"enum": ["celsius", "fahrenheit"]}
        city = {"type": "string", "minLength": 1, "maxLength": 100}
        return {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"city": city, "unit": unit},
                    "required": ["city"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "latitude": {"type": "integer", "minimum": -90, "maximum": 90},
                        "longitude": {"type": "integer", "minimum": -180, "maximum": 180},
                        "unit": unit,
                    },
                    "required": ["latitude", "longitude"],
                    "additionalProperties": False,
                },
            ]
        }

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def execute(self, args: WeatherArgs) -> JSONValue:
        if args.latitude is not None and args.longitude is not None:
            # Coordinates are what the model could check; a city next to them is a label.
            latitude, longitude = args.latitude, args.longitude
            location = args.city or f"{latitude},{longitude}"
        elif args.city is not None:
            location, latitude, longitude = find_city(args.city)
        else:  # unreachable through validation; arguments built with model_construct skip it
            raise ToolFailure("give a city, or latitude and longitude")
        current = await self._fetch_current(latitude, longitude, args.unit)
        code = _number(current, "weather_code")
        return {
            "location": location,
            "latitude": latitude,
            "longitude": longitude,
            "temperature": _number(current, "temperature_2m"),
            "unit": args.unit,
            "humidity_percent": _number(current, "relative_humidity_2m"),
            "wind_speed_kmh": _number(current, "wind_speed_10m"),
            "conditions": WMO_CODES.get(int(code), f"unknown (WMO code {code:g})"),
        }

    async def _fetch_current(self, latitude: float, longitude: float, unit: str) -> dict[str, object]:
        params = {
            "latitude": str(latitude),
            "longitude": str(longitude),
            "current": ",".join(_CURRENT_FIELDS),
            "temperature_unit": unit,
            "wind_speed_unit": "kmh",
        }
        try:
            async with self._client.stream("GET", self._url, params=params) as response:
                if not response.is_success:
                    raise ToolFailure(f"weather service answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise ToolFailure(f"weather service answer is larger than {MAX_RESPONSE_BYTES} bytes")
        except httpx.TimeoutException:
            raise ToolFailure("weather service did not answer in time") from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise ToolFailure(f"weather service is unreachable ({type(exc).__name__})") from None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ToolFailure("weather service answered with something that is not JSON") from None
        current = data.get("current") if isinstance(data, dict) else None
        if not isinstance(current, dict):
            raise ToolFailure("weather service answer lacks the 'current' object")
        return current
