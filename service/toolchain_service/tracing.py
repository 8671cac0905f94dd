"""OpenTelemetry spans for stages, optional and free when off.

    toolchain.v1.ToolchainService/StreamSynthesis     SERVER, parent: the caller's traceparent
    ├── tool_phase
    │   ├── chat fake-model                          CLIENT, one per backend attempt
    │   └── execute_tool calculator                  one per executed tool call
    └── synthesis_phase
        └── chat fake-model

The `otel` extra (opentelemetry-api and -sdk) is optional: without it this module still
imports and every helper is a no-op. Tracing is on only after `enable()` (the server calls
it when `tracing = true`); until then the module-level `_tracer` is None and each helper
returns a shared null context manager after one global lookup, so the hot path pays
nothing else. The helpers make the span current (contextvars), so spans opened below
(tool calls run in tasks that copy the context) get the right parent. Nothing here
imports grpc: the runner and the tool registry call these helpers directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from toolchain_service.errors import StageError

log = logging.getLogger(__name__)

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the `otel` extra is not installed
    AVAILABLE = False
else:
    AVAILABLE = True

SERVICE = "toolchain.v1.ToolchainService"
INSTRUMENTATION = "toolchain_service"

AttributeValue = str | bool | int | float


class SpanLike(Protocol):
    def set_attribute(self, key: str, value: AttributeValue) -> None: ...

    def is_recording(self) -> bool: ...


class _NoSpan:
    """What the helpers yield while tracing is off."""

    __slots__ = ()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass

    def is_recording(self) -> bool:
        return False


NO_SPAN = _NoSpan()
_NULL: contextlib.nullcontext[SpanLike] = contextlib.nullcontext(NO_SPAN)

#: The module-level switch: None while tracing is off.
_tracer: Any = None


def enabled() -> bool:
    return _tracer is not None


def enable(tracer_provider: Any = None) -> None:
    """Start making spans, with `tracer_provider` or the global one."""
    global _tracer  # noqa: PLW0603 - the module-level switch
    if not AVAILABLE:
        raise RuntimeError("tracing needs OpenTelemetry: pip install 'toolchain-grpc[otel]'")
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    _tracer = provider.get_tracer(INSTRUMENTATION)


def disable() -> None:
    global _tracer  # noqa: PLW0603 - the module-level switch
    _tracer = None


def span(
    name: str, attributes: Mapping[str, AttributeValue] | None = None, *, client: bool = False
) -> contextlib.AbstractContextManager[SpanLike]:
    """A child span of the current one, current while the block runs (no-op when off).

    A StageError ends it with status ERROR and `error.type` = the error's reason; a
    cancellation (or the closing of an async generator) marks it `toolchain.cancelled`.
    """
    if _tracer is None:
        return _NULL
    return _active_span(name, attributes, client)


@contextlib.contextmanager
def _active_span(name: str, attributes: Mapping[str, AttributeValue] | None, client: bool) -> Iterator[Any]:
    current = _tracer.start_span(
        name, kind=SpanKind.CLIENT if client else SpanKind.INTERNAL, attributes=attributes
    )
    token = otel_context.attach(trace.set_span_in_context(current))
    try:
        yield current
    except (asyncio.CancelledError, GeneratorExit):
        current.set_attribute("toolchain.cancelled", True)
        raise
    except StageError as exc:
        current.set_attribute("error.type", exc.reason)
        current.set_status(Status(StatusCode.ERROR, exc.message))
        raise
    except Exception as exc:
        current.set_attribute("error.type", type(exc).__qualname__)
        current.record_exception(exc)
        current.set_status(Status(StatusCode.ERROR, str(exc)))
        raise
    finally:
        otel_context.detach(token)
        current.end()


class StageTrace:
    """The stage span, current from `start_stage` until `end`."""

    __slots__ = ("_span", "_token")

    def __init__(self, span_: Any, token: Any) -> None:
        self._span = span_
        self._token = token

    def end(self, attributes: Mapping[str, AttributeValue], error: str | None = None) -> None:
        self._span.set_attributes(attributes)
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        try:
            otel_context.detach(self._token)
        finally:
            self._span.end()


def start_stage(rpc: str, metadata: Callable[[], Any]) -> StageTrace | None:
    """The SERVER span of one call, child of the caller's `traceparent` when it sent one.
    `metadata` returns the call's metadata as (key, value) pairs."""
    if _tracer is None:
        return None
    pairs: Iterable[tuple[str, str | bytes]] = metadata() or ()
    carrier = {key: value for key, value in pairs if isinstance(value, str)}
    parent = propagate.extract(carrier)
    current = _tracer.start_span(
        f"{SERVICE}/{rpc}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": rpc},
    )
    return StageTrace(current, otel_context.attach(trace.set_span_in_context(current, parent)))


def install_sdk_from_env() -> Callable[[], None] | None:
    """For `serve`: unless something (e.g. `opentelemetry-instrument`) already installed a
    tracer provider, install an SDK one exporting to OTEL_TRACES_EXPORTER (`otlp`, the
    default, needs opentelemetry-exporter-otlp-proto-http; `console`; `none`). Returns
    the function that flushes and shuts it down, or None when nothing was installed."""
    if not AVAILABLE or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None
    try:
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        log.warning("tracing: opentelemetry-sdk is not installed and no tracer provider is set; no spans")
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "toolchain-grpc")})
    )
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
        exporter: SpanExporter
        match name.strip():
            case "none" | "":
                continue
            case "console":
                exporter = ConsoleSpanExporter()
            case "otlp":
                try:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                        OTLPSpanExporter,
                    )
                except ImportError:
                    log.warning("tracing: OTLP export needs opentelemetry-exporter-otlp-proto-http")
                    continue
                exporter = OTLPSpanExporter()
            case other:
                log.warning("tracing: unknown OTEL_TRACES_EXPORTER %r ignored", other)
                continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider.shutdown
