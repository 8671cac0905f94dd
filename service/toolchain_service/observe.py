"""What a stage leaves behind for operators: Prometheus metrics and one log line.

The doors open a `StageRecord` per call, feed it every event and close it once with the
outcome. Metrics live in a registry owned by the observer (one per server, so tests can
run several servers in one process); `metrics_server` exposes it on its own port. The
log line is one JSON object per stage end (stage_id, rpc, backend, model, outcome,
durations, usage); prompts are never logged unless `log_prompts` is set.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from toolchain_service.errors import StageError
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

stage_log = logging.getLogger("toolchain.stage")

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


class StageRecord:
    __slots__ = ("_finished", "_first", "_observer", "_started", "done", "rpc", "spec")

    def __init__(self, observer: StageObserver, rpc: str) -> None:
        self._observer = observer
        self.rpc = rpc
        self.spec: StageSpec | None = None
        self.done: DoneEvent | None = None
        self._started = time.monotonic()
        self._first = True
        self._finished = False
        observer.metrics.active.labels(rpc).inc()

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
        self._observer.metrics.errors.labels(error.reason).inc()
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

    def _finish(self, outcome: str, extra: dict[str, object]) -> None:
        if self._finished:
            return
        self._finished = True
        m = self._observer.metrics
        m.active.labels(self.rpc).dec()
        m.stages.labels(self.rpc, outcome).inc()
        if not stage_log.isEnabledFor(logging.INFO):
            return
        line: dict[str, object] = {
            "event": "stage_end",
            "rpc": self.rpc,
            "outcome": outcome,
            "duration_ms": round((time.monotonic() - self._started) * 1000, 2),
        }
        if self.spec is not None:
            line.update(
                stage_id=self.spec.stage_id, backend=self.spec.backend or "(default)", model=self.spec.model
            )
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
        stage_log.info(json.dumps(line))


class StageObserver:
    def __init__(self, metrics: Metrics | None = None, log_prompts: bool = False) -> None:
        self.metrics = metrics or Metrics()
        self.log_prompts = log_prompts

    def start(self, rpc: str) -> StageRecord:
        return StageRecord(self, rpc)
