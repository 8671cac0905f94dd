"""The `toolchain` command: run the server, run stages, list tools, cancel stages.

    toolchain serve [--address HOST:PORT] [--config FILE] [--print-config] [--log-format text|json]
                    [--workers N]
    toolchain run [options] PROMPT        stream a stage (StreamSynthesis by default)
    toolchain tools [--json]              list the server's tools
    toolchain cancel STAGE_ID             cancel a running stage

Exit codes: 0 success, 1 the call failed, 2 bad usage or configuration, 130 cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO

import grpc
from toolchain_proto.v1 import toolchain_pb2 as pb

from toolchain_client.aio import PhaseOptions, ToolchainClient, error_details
from toolchain_client.credentials import tls_credentials
from toolchain_client.render import (
    event_to_json,
    format_cancel,
    format_done,
    format_error,
    format_tool_table,
    format_tools,
    message_to_json,
)
from toolchain_client.sync import SyncToolchainClient

__all__ = ["main", "redact"]

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130

REDACTED = "<redacted>"
_SECRET_WORDS = ("token", "secret", "password", "passwd", "key")
_NOT_SECRET = frozenset({"api_key_env"})
_TOKEN_COUNT = re.compile(r"tokens(?![a-z])")


# --- serve ----------------------------------------------------------------------------


def _is_secret(key: str) -> bool:
    name = key.lower()
    if name in _NOT_SECRET:
        return False
    name = _TOKEN_COUNT.sub("", name)  # "max_tokens" counts tokens, it holds none
    return any(word in name for word in _SECRET_WORDS)


def redact(data: Any) -> Any:
    """A copy of JSON-like `data` with the values of secret-looking keys replaced.

    A key is secret when it contains "token", "secret", "password" or "key" (any case),
    except `api_key_env` (it names an environment variable, it holds no key) and token
    counts such as `max_tokens`. Empty values stay visible; everything else under a
    secret key becomes "<redacted>".
    """
    if isinstance(data, dict):
        return {
            key: (REDACTED if value not in ("", None) else value)
            if isinstance(key, str) and _is_secret(key)
            else redact(value)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact(item) for item in data]
    return data


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from toolchain_service.config import CONFIG_FILE_ENV, ConfigError, load_settings  # noqa: PLC0415
        from toolchain_service.logs import configure_logging as configure_service_logging  # noqa: PLC0415
        from toolchain_service.transport.server import serve  # noqa: PLC0415
        from toolchain_service.workers import (  # noqa: PLC0415
            WorkerFields,
            exit_with_parent,
            supervise,
            worker_settings,
        )
    except ImportError as exc:
        print(f"toolchain serve needs the server package (toolchain_service): {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.config:
        os.environ[CONFIG_FILE_ENV] = args.config
    overrides: dict[str, Any] = {}
    if args.address:
        overrides["address"] = args.address
    if args.log_format:
        overrides["log_format"] = args.log_format
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.workers is not None:
        overrides["workers"] = args.workers
    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(json.dumps(redact(settings.model_dump(mode="json")), indent=2))
        return EXIT_OK
    # The stage-end record's fields become JSON fields (or key=value pairs) only with the
    # service's formatters; prompts stay out of every log unless log_prompts is set.
    handler = configure_service_logging(
        settings.log_format, settings.log_level, log_prompts=settings.log_prompts
    )
    if args.worker_index is not None:  # one of the workers of a `serve --workers N`
        settings = worker_settings(settings, args.worker_index)
        handler.addFilter(WorkerFields(args.worker_index))
        exit_with_parent()
    elif settings.workers > 1:
        try:
            return asyncio.run(supervise(settings, lambda index: _worker_command(args, index)))
        except KeyboardInterrupt:  # before the supervisor installed its own SIGINT handler
            return EXIT_CANCELLED
    try:
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:
            asyncio.run(serve(settings))
        else:
            uvloop.run(serve(settings))
    except KeyboardInterrupt:  # before the server installed its own SIGINT handler
        return EXIT_CANCELLED
    except ConfigError as exc:  # found while building the parts (e.g. a missing API key)
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _worker_command(args: argparse.Namespace, index: int) -> list[str]:
    """`serve` again, as worker `index` (the environment, with the configuration file's
    path, is inherited)."""
    command = [sys.executable, "-m", "toolchain_client", "serve", "--worker-index", str(index)]
    for flag, value in (
        ("--address", args.address),
        ("--log-format", args.log_format),
        ("--log-level", args.log_level),
        ("--workers", args.workers),
    ):
        if value is not None:
            command += [flag, str(value)]
    return command


# --- run ------------------------------------------------------------------------------


class _StreamPrinter:
    """Prints a stage's events for people as they arrive."""

    def __init__(self, out: TextIO, *, dim: bool) -> None:
        self.out = out
        self.dim = dim
        self.phase: tuple[int, int] | None = None  # (phase, round)
        self.open_call: int | None = None
        self.call_names: dict[tuple[int, int, int], str] = {}
        self.line_open = False
        self.content_chars = 0

    def style(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.dim else text

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.line_open = not text.endswith("\n")

    def _close_call(self) -> None:
        if self.open_call is not None:
            self.write(")")
            self.open_call = None

    def end_line(self) -> None:
        self._close_call()
        if self.line_open:
            self.write("\n")

    def header(self, title: str) -> None:
        self.end_line()
        self.write(self.style(f"── {title} ──") + "\n")

    def chunk(self, chunk: pb.Chunk) -> None:
        if (chunk.phase, chunk.round) != self.phase:
            first = self.phase is None or chunk.round <= 1
            self.phase = (chunk.phase, chunk.round)
            if chunk.phase == pb.PHASE_SYNTHESIS:
                self.header("synthesis")
            else:
                self.header("tool phase" if first else f"tool round {chunk.round}")
        if chunk.content:
            self._close_call()
            self.write(chunk.content)
            self.content_chars += len(chunk.content)
        for delta in chunk.tool_calls:
            if delta.index != self.open_call:
                self.end_line()
                key = (chunk.phase, chunk.round, delta.index)
                if key in self.call_names:  # the call's fragments came back after another call's
                    self.write(f"→ {self.call_names[key]}(…")
                else:
                    self.call_names[key] = delta.name or "?"
                    self.write(f"→ {self.call_names[key]}(")
                self.open_call = delta.index
            self.write(delta.arguments_fragment)
        self.out.flush()

    def block(self, text: str) -> None:
        self.end_line()
        self.write(text + "\n")
        self.out.flush()


def _phase_options(max_tokens: int | None, temperature: float | None) -> PhaseOptions | None:
    if max_tokens is None and temperature is None:
        return None
    return PhaseOptions(max_tokens=max_tokens, temperature=temperature)


def _print_rpc_error(err: grpc.RpcError) -> int:
    details = error_details(err)
    print(format_error(details.to_event(), details.field_violations), file=sys.stderr)
    return EXIT_CANCELLED if details.code == grpc.StatusCode.CANCELLED else EXIT_FAILED


def _timing(started: float, first_event: float | None) -> str:
    wall = f"wall time {(time.monotonic() - started) * 1000:.0f} ms"
    if first_event is None:
        return wall
    return f"{wall}, first event after {(first_event - started) * 1000:.0f} ms"


async def _run_stream(client: ToolchainClient, args: argparse.Namespace, stage: dict[str, Any]) -> int:
    printer = _StreamPrinter(sys.stdout, dim=_use_style(sys.stdout))
    started = time.monotonic()
    first_event: float | None = None
    code: int | None = None  # set by the terminal event
    events: AsyncIterator[pb.StageEvent] = (
        client.stream_tools(**stage) if args.tools_only else client.stream_synthesis(**stage)
    )
    try:
        async for event in events:
            if first_event is None:
                first_event = time.monotonic()
                if not args.json:
                    print(printer.style(f"stage {event.stage_id}"), file=sys.stderr, flush=True)
            if args.json:
                print(event_to_json(event), flush=True)
            kind = event.WhichOneof("event")
            if kind == "chunk":
                if not args.json:
                    printer.chunk(event.chunk)
            elif kind == "tool_summary":
                if not args.json:
                    printer.block(format_tool_table(event.tool_summary.results))
            elif kind == "done":
                code = EXIT_OK
                if not args.json:
                    if printer.content_chars == 0 and event.done.text:
                        printer.block(event.done.text)
                    printer.end_line()
                    printer.block(format_done(event.done) + "\n" + _timing(started, first_event))
            elif kind == "cancel":
                code = EXIT_CANCELLED
                if not args.json:
                    printer.end_line()
                    sys.stdout.flush()
                    print(format_cancel(event.cancel), file=sys.stderr)
            elif kind == "error":
                code = EXIT_FAILED
                if not args.json:
                    printer.end_line()
                    sys.stdout.flush()
                    print(format_error(event.error), file=sys.stderr)
    except grpc.RpcError as err:
        if code is not None:  # the stream's status repeats its terminal event
            return code
        printer.end_line()
        sys.stdout.flush()
        return _print_rpc_error(err)
    if code is None:
        printer.end_line()
        print("error: the stream ended without a Done, Cancel or Error event", file=sys.stderr)
        return EXIT_FAILED
    return code


async def _run_unary(client: ToolchainClient, args: argparse.Namespace, stage: dict[str, Any]) -> int:
    started = time.monotonic()
    done = pb.Done()
    response: pb.RunToolsResponse | pb.RunSynthesisResponse
    try:
        if args.tools_only:
            response = await client.run_tools(**stage)
        else:
            response = await client.run_synthesis(**stage)
            if response.HasField("synthesis_phase"):
                done.synthesis_phase.CopyFrom(response.synthesis_phase)
    except grpc.RpcError as err:
        return _print_rpc_error(err)
    if args.json:
        print(message_to_json(response), flush=True)
        return EXIT_OK
    done.tool_phase.CopyFrom(response.tool_phase)
    done.text = response.text
    printer = _StreamPrinter(sys.stdout, dim=_use_style(sys.stdout))
    print(printer.style(f"stage {response.stage_id}"), file=sys.stderr, flush=True)
    printer.header("tools")
    printer.block(format_tool_table(response.tool_results))
    printer.header("answer" if not args.tools_only else "tool phase text")
    printer.block(response.text)
    printer.block(format_done(done) + "\n" + _timing(started, None))
    return EXIT_OK


async def _run(args: argparse.Namespace, prompt: str) -> int:
    stage: dict[str, Any] = {
        "user_prompt": prompt,
        "system_prompt": args.system,
        "stage_id": args.stage_id,
        "model": args.model,
        "backend": args.backend,
        "tools": [name.strip() for name in (args.tools or "").split(",") if name.strip()],
        "tool_phase": _phase_options(args.tool_max_tokens, args.tool_temperature),
        "synthesis_phase": _phase_options(args.synthesis_max_tokens, args.synthesis_temperature),
        "max_rounds": args.max_rounds,
        "tool_choice": _tool_choice(args.tool_choice),
        "repair_invalid_calls": args.repair,
    }
    async with ToolchainClient(args.target, **_connection(args)) as client:
        if args.unary:
            return await _run_unary(client, args, stage)
        return await _run_stream(client, args, stage)


def _tool_choice(text: str | None) -> str | pb.ToolChoice | None:
    if text is not None and text.startswith("tool:"):
        return pb.ToolChoice(tool=text.removeprefix("tool:"))
    return text


def _use_style(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def _cmd_run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args, prompt))
    except KeyboardInterrupt:  # asyncio.run cancelled the task, which cancelled the call
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("cancelled (Ctrl-C)", file=sys.stderr)
        return EXIT_CANCELLED


# --- tools, cancel --------------------------------------------------------------------


def _cmd_tools(args: argparse.Namespace) -> int:
    try:
        with SyncToolchainClient(args.target, **_connection(args)) as client:
            tools = client.list_tools()
    except grpc.RpcError as err:
        return _print_rpc_error(err)
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    if args.json:
        print(message_to_json(pb.ListToolsResponse(tools=tools)))
    else:
        print(format_tools(tools))
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    try:
        with SyncToolchainClient(args.target, **_connection(args)) as client:
            client.cancel_stage(args.stage_id)
    except grpc.RpcError as err:
        return _print_rpc_error(err)
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    print(f"cancellation requested for stage {args.stage_id}")
    return EXIT_OK


# --- arguments ------------------------------------------------------------------------


def _tool_choice_arg(text: str) -> str:
    if text in ("auto", "required", "none") or (text.startswith("tool:") and len(text) > len("tool:")):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, required, none or tool:NAME, got {text!r}")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _client_options(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"server address host:port (default {DEFAULT_TARGET})"
    )
    parser.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS", help=timeout_help)
    parser.add_argument(
        "--token",
        default=os.environ.get("TOOLCHAIN_TOKEN") or None,
        help="bearer token for a server with auth on (default: $TOOLCHAIN_TOKEN)",
    )
    tls = parser.add_argument_group("TLS (any of these turns TLS on)")
    tls.add_argument("--tls", action="store_true", help="TLS, trusting the system's CA roots")
    tls.add_argument("--ca-file", metavar="PEM", help="CA certificates to trust instead of the system's")
    tls.add_argument(
        "--cert-file", metavar="PEM", help="client certificate, for mutual TLS (with --key-file)"
    )
    tls.add_argument("--key-file", metavar="PEM", help="private key of --cert-file")


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """The client's keyword arguments for --token and the TLS options."""
    options: dict[str, Any] = {"timeout": args.timeout, "token": args.token}
    if args.tls or args.ca_file or args.cert_file or args.key_file:
        try:
            options["credentials"] = tls_credentials(
                ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return options


class UsageError(Exception):
    """A command-line option that cannot work (exit 2, one line)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolchain", description="Run and call the toolchain.v1 gRPC service."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server until SIGTERM/SIGINT")
    serve.add_argument("--address", help="host:port to listen on (overrides the configuration)")
    serve.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (sets TOOLCHAIN_CONFIG_FILE)"
    )
    serve.add_argument("--print-config", action="store_true", help="print the effective settings as JSON")
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines on stderr (overrides log_format; default text)",
    )
    serve.add_argument("--log-level", help="logging level (overrides log_level; default INFO)")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N server processes on the one port (SO_REUSEPORT; overrides workers; default 1), "
        "restarted when one dies; N > 1 needs a fixed port. Each worker is an independent server "
        "unless cluster.redis_url is set: without it CancelStage reaches only stages on the "
        "worker the caller's connection landed on",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    serve.set_defaults(handler=_cmd_serve)

    run = commands.add_parser("run", help="run one stage and print its events")
    _client_options(run, "deadline of the call")
    run.add_argument("--system", default="", metavar="TEXT", help="system prompt")
    run.add_argument("--backend", default="", metavar="NAME", help="backend name (default: the server's)")
    run.add_argument("--model", default="", metavar="NAME", help="model name (default: the backend's)")
    run.add_argument("--tools", metavar="A,B", help="tools the model may call (default: all)")
    run.add_argument("--tool-max-tokens", type=int, metavar="N")
    run.add_argument("--tool-temperature", type=float, metavar="T")
    run.add_argument("--synthesis-max-tokens", type=int, metavar="N")
    run.add_argument("--synthesis-temperature", type=float, metavar="T")
    run.add_argument("--stage-id", default="", metavar="ID", help="stage id (default: the server makes one)")
    run.add_argument(
        "--max-rounds", type=int, metavar="N", help="tool rounds the model may have (default: the server's)"
    )
    run.add_argument(
        "--tool-choice",
        metavar="CHOICE",
        help="first round: auto, required, none, or tool:NAME (default: auto)",
        type=_tool_choice_arg,
    )
    run.add_argument(
        "--repair", action="store_true", help="let the model correct calls that failed validation"
    )
    run.add_argument("--tools-only", action="store_true", help="tool phase only (StreamTools / RunTools)")
    run.add_argument("--unary", action="store_true", help="one response (RunSynthesis / RunTools)")
    run.add_argument("--json", action="store_true", help="one JSON object per event per line")
    run.add_argument("prompt", metavar="PROMPT", help="user prompt; - reads it from stdin")
    run.set_defaults(handler=_cmd_run)

    tools = commands.add_parser("tools", help="list the server's tools")
    _client_options(tools, "deadline of the call")
    tools.add_argument("--json", action="store_true", help="print the ListTools response as JSON")
    tools.set_defaults(handler=_cmd_tools)

    cancel = commands.add_parser("cancel", help="cancel a running stage")
    _client_options(cancel, "deadline of the call")
    cancel.add_argument("stage_id", metavar="STAGE_ID")
    cancel.set_defaults(handler=_cmd_cancel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
