"""Tool plugins: installed Python packages that offer tools through the entry-point
group `toolchain.tools`.

A plugin package declares in its pyproject.toml

    [project.entry-points."toolchain.tools"]
    wordcount = "toolchain_wordcount:tools"

and the object the entry point names is either

- a `Tool` subclass, instantiated with no arguments, or
- a callable taking no arguments that returns a `Tool` or a list of them.

Only the entry points named in `tools.plugins` are loaded: loading one imports and runs
its package's code, so having a package installed (perhaps as someone else's dependency)
must not be enough to put code into the server. Each tool's `source` becomes
"plugin:<distribution name>".

A plugin that is not installed, fails to import, raises, or returns something that is no
valid tool stops start-up: `ConfigError` naming `tools.plugins` and what went wrong.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from toolchain_service.config import ConfigError
from toolchain_service.tools.base import Tool

log = logging.getLogger(__name__)

GROUP = "toolchain.tools"
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _fail(what: str) -> ConfigError:
    return ConfigError(f"invalid configuration: tools.plugins: {what}")


def _distribution(entry: importlib.metadata.EntryPoint) -> str:
    dist = entry.dist
    return dist.name if dist is not None else entry.module.split(".", 1)[0]


def _made(entry: importlib.metadata.EntryPoint, what: str) -> list[Tool[Any]]:
    """The tools the entry point's object makes."""
    try:
        target = entry.load()
    except Exception as exc:  # ImportError, SyntaxError, an error at import time: all the plugin's
        raise _fail(f"{what} did not load: {type(exc).__name__}: {exc}") from None
    try:
        if inspect.isclass(target):
            if not issubclass(target, Tool):
                raise _fail(f"{what} names the class {target.__name__}, which is no Tool subclass")
            made: Any = target()
        elif callable(target):
            made = target()
        else:
            raise _fail(f"{what} names a {type(target).__name__}, not a Tool subclass or a callable")
    except ConfigError:
        raise
    except Exception as exc:
        raise _fail(f"{what} raised {type(exc).__name__}: {exc}") from None
    tools = made if isinstance(made, list | tuple) else [made]
    for tool in tools:
        if not isinstance(tool, Tool):
            raise _fail(f"{what} returned a {type(tool).__name__}, not a Tool (or a list of them)")
    return list(tools)


def _check(tool: Tool[Any], what: str) -> None:
    name = getattr(tool, "name", None)
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise _fail(f"{what} returned a tool named {name!r}: a name is 1-64 letters, digits, '_' or '-'")
    if not isinstance(getattr(tool, "description", None), str):
        raise _fail(f"{what}: tool {name!r} has no description")
    try:
        json.dumps(tool.spec())
    except Exception as exc:
        raise _fail(f"{what}: tool {name!r} has no usable JSON schema: {type(exc).__name__}: {exc}") from None


def load_plugins(names: Sequence[str]) -> list[Tool[Any]]:
    """The tools of the entry points named in `names`, in that order."""
    if not names:
        return []
    installed = {entry.name: entry for entry in importlib.metadata.entry_points(group=GROUP)}
    tools: list[Tool[Any]] = []
    for name in dict.fromkeys(names):
        entry = installed.get(name)
        if entry is None:
            raise _fail(
                f"no entry point {name!r} in the group {GROUP!r} is installed;"
                f" installed: {', '.join(sorted(installed)) or 'none'}"
            )
        dist = _distribution(entry)
        what = f"plugin {name!r} ({entry.value} in {dist})"
        made = _made(entry, what)
        if not made:
            raise _fail(f"{what} returned no tool")
        for tool in made:
            _check(tool, what)
            tool.source = f"plugin:{dist}"
        log.debug("plugin %s from %s: %s", name, dist, ", ".join(t.name for t in made))
        tools.extend(made)
    return tools
