"""The tool interface.

A tool has a `name`, a `description` shown to the model, a JSON schema of its arguments,
a way to validate arguments against it, and an async `execute`. Register instances with
`ToolRegistry`. A local tool (built in or from a plugin package) declares an `Arguments`
pydantic model, the single source of its JSON schema and of argument validation:

    class Echo(Tool[EchoArgs]):
        name = "echo"
        description = "Repeat a text."
        Arguments = EchoArgs

        async def execute(self, args: EchoArgs) -> JSONValue:
            return {"text": args.text}

Tools whose schema is only known at run time (an MCP server's, `tools/mcp.py`) override
`parameters_schema` and `parse_arguments` instead of declaring `Arguments`.

`execute` may raise `ToolFailure` with a message for the model and the caller; any other
exception is reported as a failure with its message, never with a traceback.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

JSONValue = Any  # what json.dumps accepts: dict, list, str, int, float, bool, None

#: `Tool.source` of the tools that ship with the server.
BUILTIN_SOURCE = "builtin"


class ToolArguments(BaseModel):
    """Base of every tool's arguments: JSON types are not coerced and unknown keys are
    refused, so validation means what the JSON schema says."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


ArgsT = TypeVar("ArgsT")


class ToolFailure(Exception):
    """A tool's own, expected failure (bad city, division by zero, upstream down)."""


class InvalidArguments(Exception):
    """Arguments that do not match the tool's schema; the message says where."""


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        parts.append(f"{where}: {err['msg']}")
    return "arguments do not match the tool's schema: " + "; ".join(parts)


class Tool(abc.ABC, Generic[ArgsT]):
    name: str
    description: str
    #: The arguments model of a local tool (see the module docstring).
    Arguments: ClassVar[type[ToolArguments]]
    #: Extra guidance appended to the system prompt when the tool is enabled.
    instructions: str = ""
    #: Per-tool timeout in seconds; None: the server's tool timeout.
    timeout: float | None = None
    #: An example exchange, (a user's question, the arguments that answer it): shown to
    #: small models (the embedded one) as a worked example, which they follow far better
    #: than a schema. None: no example.
    example: tuple[str, dict[str, Any]] | None = None
    #: Where the tool comes from, as ListTools shows it: "builtin", "plugin:<distribution>"
    #: or "mcp:<server>". The plugin loader sets it on the tools a plugin returns.
    source: str = BUILTIN_SOURCE

    @abc.abstractmethod
    async def execute(self, args: ArgsT) -> JSONValue:
        """Run the tool on validated arguments and return a JSON-serialisable result."""

    async def aclose(self) -> None:
        """Release what the tool holds (HTTP clients)."""

    def parameters_schema(self) -> dict[str, Any]:
        schema = self.Arguments.model_json_schema()
        schema.pop("title", None)
        return schema

    def parse_arguments(self, text: str) -> ArgsT:
        """Validate the call's arguments (`text`: a JSON object) against the schema and
        return what `execute` takes; raises InvalidArguments saying what is wrong."""
        try:
            args: ArgsT = self.Arguments.model_validate_json(text)  # type: ignore[assignment]  # ArgsT is the model
        except ValidationError as exc:
            raise InvalidArguments(describe_validation(exc)) from None
        return args

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
