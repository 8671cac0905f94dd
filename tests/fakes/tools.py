"""Tools written for the tests: they record what ran, and misbehave on demand."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field
from toolchain_service.tools.base import JSONValue, Tool, ToolArguments, ToolFailure


class EchoArgs(ToolArguments):
    text: str = Field(description="text to repeat", max_length=10_000)


class Echo(Tool[EchoArgs]):
    """Returns its argument; counts its executions so tests can prove what ran."""

    name = "echo"
    description = "Repeat a text."
    Arguments = EchoArgs

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def execute(self, args: EchoArgs) -> JSONValue:
        self.calls.append(args.text)
        return {"text": args.text}


class BehaveArgs(ToolArguments):
    mode: str = Field(
        description="ok, raise, fail, hang, unserialisable, huge, int_keys, surrogate, nan or deep"
    )
    seconds: float = Field(0.0, ge=0, le=60, description="sleep before answering")


class Misbehave(Tool[BehaveArgs]):
    """Misbehaves as asked; records starts, finishes and cancellations."""

    name = "misbehave"
    description = "A test tool that misbehaves on demand."
    Arguments = BehaveArgs
    timeout = 0.5

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.running = 0
        self.started_event = asyncio.Event()

    async def execute(self, args: BehaveArgs) -> JSONValue:
        self.started += 1
        self.running += 1
        self.started_event.set()
        try:
            if args.seconds:
                await asyncio.sleep(args.seconds)
            result: Any
            if args.mode == "hang":
                await asyncio.Event().wait()
            if args.mode == "raise":
                raise RuntimeError("the tool broke")
            if args.mode == "fail":
                raise ToolFailure("the tool could not do it")
            if args.mode == "unserialisable":
                result = {"value": object()}
            elif args.mode == "huge":
                result = {"blob": "x" * (1 << 20)}
            elif args.mode == "int_keys":  # JSON-serialisable, but not as it is
                result = {1: "one", "pair": (2, 3)}
            elif args.mode == "surrogate":  # a lone surrogate: not UTF-8-encodable
                result = {"text": "half an emoji \ud83d"}
            elif args.mode == "nan":
                result = {"value": float("nan")}
            elif args.mode == "deep":  # deeper than anything can serialise
                result = []
                for _ in range(100_000):
                    result = [result]
            else:
                result = {"mode": args.mode}
            self.finished += 1
            return result
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
