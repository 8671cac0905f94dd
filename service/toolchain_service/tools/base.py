"""The tool plugin interface.

A tool is a class with a `name`, a `description` shown to the model, an `Arguments`
pydantic model (the single source of its JSON schema and of argument validation) and an
async `execute`. Register instances with `ToolRegistry`. Example:

    class Echo(Tool[EchoArgs]):
        name = "echo"
        description = "Repeat a text."
        Arguments = EchoArgs

        async def execute(self, args: EchoArgs) -> JSONValue:
            return {"text": args.text}

`execute` may raise `ToolFailure` with a message for the model and the caller; any other
exception is reported as a failure with its message, never with a traceback.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

JSONValue = Any  # what json.dumps accepts: dict, list, str, int, float, bool, None


class ToolArguments(BaseModel):
    """Base of every tool's arguments: JSON types are not coerced and unknown keys are
    refused, so validation means what the JSON schema says."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


ArgsT = TypeVar("ArgsT", bound=ToolArguments)


class ToolFailure(Exception):
    """A tool's own, expected failure (bad city, division by zero, upstream down)."""


class Tool(abc.ABC, Generic[ArgsT]):
    name: ClassVar[str]
    description: ClassVar[str]
    Arguments: ClassVar[type[ToolArguments]]
    #: Extra guidance appended to the system prompt when the tool is enabled.
    instructions: ClassVar[str] = ""
    #: Per-tool timeout in seconds; None: the server's tool timeout.
    timeout: ClassVar[float | None] = None
    #: An example exchange, (a user's question, the arguments that answer it): shown to
    #: small models (the embedded one) as a worked example, which they follow far better
    #: than a schema. None: no example.
    example: ClassVar[tuple[str, dict[str, Any]] | None] = None

    @abc.abstractmethod
    async def execute(self, args: ArgsT) -> JSONValue:
        """Run the tool on validated arguments and return a JSON-serialisable result."""

    async def aclose(self) -> None:
        """Release what the tool holds (HTTP clients)."""

    def parameters_schema(self) -> dict[str, Any]:
        schema = self.Arguments.model_json_schema()
        schema.pop("title", None)
        return schema

    def grammar_schema(self) -> dict[str, Any] | None:
        """A JSON schema that a sampling grammar can enforce and that admits only
        arguments passing `Arguments` validation, where the parameters schema alone does
        not (rules across fields); None: derived from the parameters schema."""
        return None

    def spec(self) -> dict[str, Any]:
        """The OpenAI `tools` entry for this tool."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters_schema(),
            },
        }
