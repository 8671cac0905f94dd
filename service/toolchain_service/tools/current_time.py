"""current_time: the date and time now in an IANA time zone (zoneinfo + tzdata)."""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pydantic import Field

from toolchain_service.tools.base import JSONValue, Tool, ToolArguments, ToolFailure


class CurrentTimeArgs(ToolArguments):
    timezone: str = Field(
        default="UTC",
        description="IANA time zone name, e.g. 'Europe/Paris', 'America/New_York' or 'UTC'",
        examples=["Europe/Paris"],
        min_length=1,
        max_length=64,
    )


@functools.cache
def _zones_by_folded_name() -> dict[str, str]:
    # Scanning tzdata takes a while, so only on the first miss and then once.
    return {name.casefold(): name for name in zoneinfo.available_timezones()}


def _zone(name: str) -> zoneinfo.ZoneInfo:
    key = name.strip()
    try:
        return zoneinfo.ZoneInfo(key)
    # Keys are file paths underneath: "../x", "Europe" (a directory) or a NUL byte fail
    # with ValueError or OSError rather than ZoneInfoNotFoundError.
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    # Models often write "europe/paris" or "utc"; the canonical spelling is unambiguous.
    canonical = _zones_by_folded_name().get(key.casefold())
    if canonical is not None:
        return zoneinfo.ZoneInfo(canonical)
    raise ToolFailure(f"unknown time zone {name!r}; use an IANA name such as Europe/Paris")


def _format_offset(offset: timedelta | None) -> str:
    seconds = int((offset or timedelta()).total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    return f"{sign}{hours:02d}:{rest // 60:02d}"


# strftime("%A") follows the process locale; the answer should not.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CurrentTime(Tool[CurrentTimeArgs]):
    name = "current_time"
    description = "Get the current date, time, weekday and UTC offset in a time zone."
    example = ("What time is it in Sydney?", {"timezone": "Australia/Sydney"})
    Arguments = CurrentTimeArgs

    def __init__(self, clock: Callable[[], datetime] = _utc_now) -> None:
        """`clock` returns an aware datetime; tests pass a fixed one."""
        self._clock = clock

    async def execute(self, args: CurrentTimeArgs) -> JSONValue:
        zone = _zone(args.timezone)
        now = self._clock().astimezone(zone)
        return {
            "timezone": zone.key,
            "iso": now.isoformat(timespec="seconds"),
            "date": now.strftime("%Y-%m-%d"),
            "time": now.strftime("%H:%M:%S"),
            "weekday": _WEEKDAYS[now.weekday()],
            "utc_offset": _format_offset(now.utcoffset()),
        }
