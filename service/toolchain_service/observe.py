"""What a stage leaves behind for operators: Prometheus metrics and one log line.

The doors open a `StageRecord` per call, feed it every event and close it once with the
outcome. Metrics live in a registry owned by the observer (one per server, so tests can
run several servers in one process); `start_metrics_server` exposes it over HTTP on its
own port. The log line is one record per stage end on logger "toolchain.stage" whose
structured fields (stage_id, rpc, backend, model, outcome, durations, usage) the
formatters of `logs.py` print as JSON fields or key=value pairs; prompts are never logged
unless `log_prompts` is set. With tracing on, the record also holds the stage's span.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from toolchain_service import tracing
from toolchain_service.backends.budget import ByteBudget
from toolchain_service.errors import BackendError, StageError
from toolchain_service.events import (
    CancelReason,
    ChunkEvent,
    DoneEvent,
    PhaseStats,
    StageEvent,
    StageSpec,
    ToolOutcome,
    ToolSummaryEvent,
)
from toolchain_service.logs import FIELDS

stage_log = logging.getLogger("toolchain.stage")
log = logging.getLogger(__name__)

#: Returns the call's metadata: (key, value) pairs (grpc.aio's invocation_metadata).
Metadata = Callable[[], Any]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stages = Counter("toolchain_stages", "Stages by RPC and outcome", ["rpc", "outcome"], registry=r)
        self.phase_seconds = Histogram(
            "toolchain_phase_seconds", "Phase wall time", ["phase"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.first_event_seconds = Histogram(
            "toolchain_first_event_seconds",
            "Time from request to first event",
            ["rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("toolchain_tokens", "Tokens by phase and kind", ["phase", "kind"], registry=r)
        self.tool_calls = Counter(
            "toolchain_tool_calls", "Tool calls by tool and outcome", ["tool", "outcome"], registry=r
        )
        self.active = Gauge("toolchain_active_stages", "Stages running now", ["rpc"], registry=r)
        self.errors = Counter(
            "toolchain_stage_errors", "Failed stages by error reason", ["reason"], registry=r
        )
        self.retries = Counter("toolchain_backend_retries", "Backend calls retried", ["phase"], registry=r)
        self.backend_errors = Counter(
            "toolchain_backend_errors",
            "Stages failed by their backend, by backend and kind (the error reason)",
            ["backend", "kind"],
            registry=r,
        )

    def watch_budget(self, budget: ByteBudget) -> None:
        """Export what the streamed stages hold for their callers, against max_buffered_bytes."""
        held = Gauge(
            "toolchain_buffered_bytes",
            "Bytes streamed stages have read from their backends and not yet written to their callers",
            registry=self.registry,
        )
        held.set_function(lambda: budget.used)
        limit = Gauge(
            "toolchain_buffered_bytes_limit", "max_buffered_bytes (0: no cap)", registry=self.registry
        )
        limit.set(budget.limit)

    def watch_queues(self, backends: Iterable[object]) -> None:
        """Export the queue statistics of backends that keep them (the local model)."""
        queued = [b for b in backends if isinstance(b, QueueStats)]
        if queued:
            self.registry.register(_QueueCollector(queued))


@runtime_checkable
class QueueStats(Protocol):
    """What LocalModelBackend exposes about its FIFO queue for sequence slots."""

    name: str
    requests_started: int
    max_queue_wait: float

    @property
    def mean_queue_wait(self) -> float: ...

    @property
    def restarts(self) -> int: ...

    def queue_depth(self) -> int: ...

    def active_requests(self) -> int: ...


class _QueueCollector(Collector):
    """Read at scrape time: the backend keeps count and mean, not each observation, so the
    wait is a summary (rate(_sum)/rate(_count) = mean wait over a window), plus gauges."""

    def __init__(self, backends: list[QueueStats]) -> None:
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        wait = SummaryMetricFamily(
            "toolchain_local_queue_wait_seconds",
            "Time local-model requests waited for a free sequence slot",
            labels=["backend"],
        )
        longest = GaugeMetricFamily(
            "toolchain_local_queue_wait_max_seconds", "Longest local-model queue wait", labels=["backend"]
        )
        depth = GaugeMetricFamily(
            "toolchain_local_queue_depth", "Local-model requests waiting now", labels=["backend"]
        )
        active = GaugeMetricFamily(
            "toolchain_local_active_requests", "Local-model requests generating now", labels=["backend"]
        )
        restarts = CounterMetricFamily(
            "toolchain_local_model_restarts", "Restarts of the local model process", labels=["backend"]
        )
        for b in self._backends:
            count = b.requests_started
            wait.add_metric([b.name], count_value=count, sum_value=b.mean_queue_wait * count)
            longest.add_metric([b.name], b.max_queue_wait)
            depth.add_metric([b.name], b.queue_depth())
            active.add_metric([b.name], b.active_requests())
            restarts.add_metric([b.name], b.restarts)
        yield from (wait, longest, depth, active, restarts)


class MetricsServer:
    """Prometheus' HTTP exposition of one registry, in its own thread."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._server, self._thread = start_http_server(int(port), host.strip("[]"), registry=registry)
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        server: WSGIServer = self._server
        thread: threading.Thread = self._thread
        server.shutdown()
        server.server_close()
        thread.join(5.0)


def start_metrics_server(registry: CollectorRegistry, address: str) -> MetricsServer:
    """Serve `registry` at http://ADDRESS/metrics (port 0: a free port)."""
    return MetricsServer(registry, address)


class StageRecord:
    __slots__ = ("_finished", "_first", "_observer", "_started", "_trace", "done", "rpc", "spec")

    def __init__(self, observer: StageObserver, rpc: str, metadata: Metadata | None = None) -> None:
        self._observer = observer
        self.rpc = rpc
        self.spec: StageSpec | None = None
        self.done: DoneEvent | None = None
        self._started = time.monotonic()
        self._first = True
        self._finished = False
        observer.metrics.active.labels(rpc).inc()
        self._trace = tracing.start_stage(rpc, metadata or tuple) if tracing.enabled() else None

    def event(self, event: StageEvent) -> None:
        m = self._observer.metrics
        if self._first:
            self._first = False
            m.first_event_seconds.labels(self.rpc).observe(time.monotonic() - self._started)
        if isinstance(event, ChunkEvent):
            return
        if isinstance(event, ToolSummaryEvent):
            for result in event.results:
                tool = "(unknown)" if result.outcome == ToolOutcome.UNKNOWN_TOOL else result.call.name
                m.tool_calls.labels(tool, result.outcome.name.lower()).inc()
        elif isinstance(event, DoneEvent):
            self.done = event
            for name, stats in (("tool", event.tool_phase), ("synthesis", event.synthesis_phase)):
                if stats is not None:
                    self._phase(name, stats)

    def _phase(self, name: str, stats: PhaseStats) -> None:
        m = self._observer.metrics
        m.phase_seconds.labels(name).observe(stats.duration)
        if stats.retries:
            m.retries.labels(name).inc(stats.retries)
        if stats.usage is not None:
            m.tokens.labels(name, "prompt").inc(stats.usage.prompt_tokens)
            m.tokens.labels(name, "completion").inc(stats.usage.completion_tokens)

    def finish_done(self) -> None:
        self._finish("ok", {})

    def finish_error(self, error: StageError) -> None:
        m = self._observer.metrics
        m.errors.labels(error.reason).inc()
        if isinstance(error, BackendError):
            m.backend_errors.labels(self._backend(), error.reason).inc()
        if error.retries:  # the phase gave up after retrying: those retries count too
            m.retries.labels(error.phase.name.lower()).inc(error.retries)
        self._finish(
            "error",
            {
                "code": error.code.name,
                "reason": error.reason,
                "phase": error.phase.name,
                "message": error.message,
            },
        )

    def finish_cancel(self, reason: CancelReason) -> None:
        self._finish("cancelled", {"cancel_reason": reason.name})

    def close(self) -> None:
        """Called last by every door: a call that ended without an outcome (the write
        of an event failed) is still counted."""
        if not self._finished:
            self._finish("aborted", {})

    def _backend(self) -> str:
        return (self.spec.backend if self.spec is not None else "") or self._observer.default_backend

    def _finish(self, outcome: str, extra: dict[str, object]) -> None:
        if self._finished:
            return
        self._finished = True
        m = self._observer.metrics
        m.active.labels(self.rpc).dec()
        m.stages.labels(self.rpc, outcome).inc()
        if self._trace is not None:
            self._end_trace(outcome, extra)
        if not stage_log.isEnabledFor(logging.INFO):
            return
        line: dict[str, object] = {
            "event": "stage_end",
            "rpc": self.rpc,
            "outcome": outcome,
            "duration_ms": round((time.monotonic() - self._started) * 1000, 2),
        }
        if self.spec is not None:
            line.update(stage_id=self.spec.stage_id, backend=self._backend(), model=self.spec.model)
            if self._observer.log_prompts:
                line.update(system_prompt=self.spec.system_prompt, user_prompt=self.spec.user_prompt)
        if self.done is not None:
            for name, stats in (("tool", self.done.tool_phase), ("synthesis", self.done.synthesis_phase)):
                if stats is not None:
                    line[f"{name}_phase"] = {
                        "model": stats.model,
                        "finish_reason": stats.finish_reason,
                        "duration_ms": round(stats.duration * 1000, 2),
                        "retries": stats.retries,
                        "usage": None
                        if stats.usage is None
                        else {
                            "prompt": stats.usage.prompt_tokens,
                            "completion": stats.usage.completion_tokens,
                        },
                    }
        line.update(extra)
        stage_log.info(
            "stage %s %s %s in %.1f ms",
            line.get("stage_id", "-"),
            self.rpc,
            outcome,
            line["duration_ms"],
            extra={FIELDS: line},
        )

    def _end_trace(self, outcome: str, extra: dict[str, object]) -> None:
        assert self._trace is not None
        attributes: dict[str, tracing.AttributeValue] = {"toolchain.outcome": outcome}
        if self.spec is not None:
            attributes.update(
                {
                    "toolchain.stage_id": self.spec.stage_id,
                    "toolchain.backend": self._backend(),
                    "gen_ai.request.model": self.spec.model,
                }
            )
        for key in ("code", "reason", "cancel_reason"):
            value = extra.get(key)
            if isinstance(value, str):
                attributes[f"toolchain.{key}"] = value
        error = f"{extra.get('reason')}: {extra.get('message')}" if outcome == "error" else None
        trace, self._trace = self._trace, None
        try:
            trace.end(attributes, error)
        except Exception:  # tracing must never fail a stage
            log.warning("ending the stage span failed", exc_info=True)


class StageObserver:
    def __init__(
        self, metrics: Metrics | None = None, log_prompts: bool = False, default_backend: str = ""
    ) -> None:
        self.metrics = metrics or Metrics()
        self.log_prompts = log_prompts
        self.default_backend = default_backend

    def start(self, rpc: str, metadata: Metadata | None = None) -> StageRecord:
        """`metadata` returns the call's metadata (read only when tracing is on)."""
        return StageRecord(self, rpc, metadata)
