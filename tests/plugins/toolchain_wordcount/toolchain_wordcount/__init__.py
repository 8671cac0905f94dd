"""A tool plugin for toolchain-grpc: `word_count`, and entry points that fail on purpose."""

from __future__ import annotations

from pydantic import Field
from toolchain_service.tools.base import JSONValue, Tool, ToolArguments


class WordCountArgs(ToolArguments):
    text: str = Field(description="the text whose words are counted", max_length=100_000)


class WordCount(Tool[WordCountArgs]):
    name = "word_count"
    description = "Count the words of a text."
    Arguments = WordCountArgs

    async def execute(self, args: WordCountArgs) -> JSONValue:
        return {"words": len(args.text.split())}


class _Calculator(WordCount):
    name = "calculator"  # the name of a built-in tool


def tools() -> list[Tool[WordCountArgs]]:
    return [WordCount()]


def raises() -> list[Tool[WordCountArgs]]:
    raise RuntimeError("the plugin cannot find its configuration")


def not_a_tool() -> object:
    return {"name": "word_count"}


def clash() -> Tool[WordCountArgs]:
    return _Calculator()
