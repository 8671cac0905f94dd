"""Server bootstrap: build the parts from settings, serve, drain on SIGTERM/SIGINT.

    settings ─▶ BackendRegistry + ToolRegistry ─▶ StageRunner ─▶ ToolchainServicer
                                                              └▶ health, reflection

Around the services: bearer-token auth (an interceptor, `auth.py`), TLS or mutual TLS on
the port, Prometheus metrics on their own HTTP port, OpenTelemetry spans.

Health ("" and toolchain.v1.ToolchainService): SERVING while at least one backend is
ready, NOT_SERVING otherwise and from the start of a drain on. Each backend has its own
entry, "toolchain.v1.ToolchainService/backend/NAME": NOT_SERVING while, for instance, the
embedded model's process is down and being restarted; so has each MCP server,
".../mcp/NAME": NOT_SERVING while it is disconnected (its tools answer FAILED meanwhile;
the server as a whole stays SERVING). Readiness is re-checked every `health_interval`
seconds and at once when a backend or an MCP server reports a change.

Tools: the built-ins, the plugins named in `tools.plugins` and the tools of the MCP
servers in `mcp_servers` (connected before the port opens), checked as one set
(`tools/catalog.py`).

Drain: health turns NOT_SERVING, the port closes (GOAWAY on open connections: new calls
are refused and go to other replicas), running stages get `shutdown_grace` seconds to
finish, then end with a Cancel event (reason SHUTDOWN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from toolchain_service import tracing
from toolchain_service.backends.budget import ByteBudget
from toolchain_service.backends.registry import BackendRegistry
from toolchain_service.config import ConfigError, Settings
from toolchain_service.events import CancelReason
from toolchain_service.logs import configure_logging
from toolchain_service.observe import MetricsServer, StageObserver, start_metrics_server
from toolchain_service.runner import StageRunner
from toolchain_service.stages import StageManager
from toolchain_service.tools.base import Tool
from toolchain_service.tools.builtin import builtin_tools
from toolchain_service.tools.catalog import select_tools
from toolchain_service.tools.plugins import load_plugins
from toolchain_service.tools.registry import ToolRegistry
from toolchain_service.transport import reflection
from toolchain_service.transport.auth import EXEMPT_PREFIXES, REFLECTION_PREFIXES, BearerAuthInterceptor
from toolchain_service.transport.decoding import DecodeGuard
from toolchain_service.transport.servicer import ToolchainServicer

if TYPE_CHECKING:
    from toolchain_service.cluster.registry import Cluster
    from toolchain_service.tools.mcp import McpServer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ToolchainService"].full_name
#: Health service name of each backend: "toolchain.v1.ToolchainService/backend/local".
BACKEND_HEALTH_PREFIX = f"{SERVICE_NAME}/backend/"
#: Health service name of each MCP server: "toolchain.v1.ToolchainService/mcp/calc".
MCP_HEALTH_PREFIX = f"{SERVICE_NAME}/mcp/"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    """A started server and its parts (tests reach into them)."""

    server: grpc.aio.Server
    port: int
    settings: Settings
    servicer: ToolchainServicer
    stages: StageManager
    backends: BackendRegistry
    tools: ToolRegistry
    health: Any  # grpc_health.aio.HealthServicer
    observer: StageObserver
    metrics: MetricsServer | None = None
    tracing: bool = False
    mcp_servers: list[McpServer] = field(default_factory=list)
    _health_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _stall_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _refreshes: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    @property
    def address(self) -> str:
        host = self.settings.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def set_health(self, status: Any) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def refresh_health(self) -> None:
        """The server: SERVING when a backend is ready, else NOT_SERVING; each backend
        under `BACKEND_HEALTH_PREFIX + name` (ignored once draining)."""
        for backend in self.backends.all():
            await self.health.set(
                BACKEND_HEALTH_PREFIX + backend.name, SERVING if backend.is_ready() else NOT_SERVING
            )
        for mcp in self.mcp_servers:
            await self.health.set(MCP_HEALTH_PREFIX + mcp.name, SERVING if mcp.is_ready() else NOT_SERVING)
        await self.set_health(SERVING if self.backends.any_ready() else NOT_SERVING)

    def _state_listeners(self) -> list[list[Callable[[], None]]]:
        """The listener lists of every part whose readiness health reports."""
        return [
            *(backend.state_listeners for backend in self.backends.all()),
            *(mcp.state_listeners for mcp in self.mcp_servers),
        ]

    def schedule_health_refresh(self) -> None:
        """A backend's readiness changed: tell health now, not at the next interval."""
        task = asyncio.get_running_loop().create_task(self.refresh_health(), name="toolchain-health-refresh")
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _watch_backends(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self.refresh_health()

    def watch_backends(self) -> None:
        self._health_task = asyncio.create_task(self._watch_backends(), name="toolchain-health")
        self._stall_task = asyncio.create_task(
            self.stages.watch_stalls(self.settings.stream_stall_seconds), name="toolchain-stalls"
        )
        if self.stages.max_loop_busy:
            self._load_task = asyncio.create_task(self.stages.load.watch(), name="toolchain-loop-load")

    async def _stop_watching(self) -> None:
        for listeners in self._state_listeners():
            with contextlib.suppress(ValueError):
                listeners.remove(self.schedule_health_refresh)
        for refresh in list(self._refreshes):
            refresh.cancel()
        for task in (self._health_task, self._stall_task, self._load_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._health_task = self._stall_task = self._load_task = None

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking stages, let running ones finish within the grace period, cancel
        the rest with reason SHUTDOWN, then stop the server."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.stages.draining = True
        await self._stop_watching()
        # Take no more calls: grpc closes the port and sends GOAWAY, so proxies and clients
        # send new calls to other replicas (a refused connection is retried elsewhere; a
        # stage answered SERVER_DRAINING would not be). The calls in progress go on. GOAWAY
        # goes first, before health says NOT_SERVING on the open Watches: a caller that
        # reacts to the health change then finds the connection closed to new calls.
        closing = asyncio.create_task(self.server.stop(grace + 5.0), name="toolchain-closing")
        await asyncio.sleep(0)  # the shutdown starts
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for good
        await self.stages.wait_idle(grace)
        cancelled = self.stages.cancel_all(CancelReason.SHUTDOWN)
        if cancelled:
            log.info("cancelled %d stages at shutdown", cancelled)
        await self.stages.wait_idle(2.0)  # the cancelled stages write their cancel events
        # What is left (health watches, resumed streams) ends after the last statuses went out.
        await self.server.stop(0.5)
        try:
            async with asyncio.timeout(5.0):
                await closing
        except TimeoutError:  # pragma: no cover - grpc did not finish its shutdown
            log.warning("the gRPC server did not finish stopping within 5 s after the drain")
        await self.stop(0)

    async def stop(self, grace: float | None = 0) -> None:
        await self._stop_watching()
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None
        if self.tracing:
            tracing.disable()
            self.tracing = False
        if self.servicer.cluster is not None:
            # Logged stages run in tasks of their own, which stopping grpc does not end.
            self.stages.cancel_all(CancelReason.SHUTDOWN)
            await self.stages.wait_idle(2.0)
            await self.servicer.cluster.aclose()
            self.servicer.cluster = None
        await self.backends.aclose()
        await self.tools.aclose()
        for mcp in self.mcp_servers:
            await mcp.aclose()


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    try:
        if not settings.tls.enabled:
            return server.add_insecure_port(settings.address)
        key, chain, client_ca = settings.tls.server_credentials_material()
        credentials = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
        return server.add_secure_port(settings.address, credentials)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"address: cannot listen on {settings.address}: {exc}") from None


async def _join_cluster(settings: Settings, stages: StageManager) -> Cluster:
    """Connect to the shared registry (the redis package loads only when it is configured)."""
    from toolchain_service.cluster.registry import Cluster  # noqa: PLC0415

    cluster = Cluster(settings.cluster, stages.control)
    try:
        await cluster.start()
    except ConnectionError as exc:
        raise ConfigError(f"cluster.redis_url: {exc}") from None
    stages.on_close = cluster.ended
    return cluster


def _start_metrics(observer: StageObserver, address: str) -> MetricsServer:
    try:
        return start_metrics_server(observer.metrics.registry, address)
    except OSError as exc:
        raise ConfigError(f"metrics_address: cannot listen on {address}: {exc}") from None


async def start_server(
    settings: Settings,
    *,
    tools: list[Tool[Any]] | None = None,
    backends: BackendRegistry | None = None,
    observer: StageObserver | None = None,
    tracer_provider: Any = None,
) -> RunningServer:
    """Build and start a server on `settings.address` (port 0: a free port).

    `tools`: the local tools, instead of the built-ins and plugins (the MCP servers'
    tools are added either way). `tracer_provider`: where the spans go when
    `settings.tracing` is on (default: the global OpenTelemetry provider)."""
    backend_registry = backends or BackendRegistry.from_settings(
        settings.backends, settings.default_backend, ByteBudget(settings.max_buffered_bytes)
    )
    local = (
        [*builtin_tools(settings.tools), *load_plugins(settings.tools.plugins)] if tools is None else tools
    )
    mcp_servers: list[McpServer] = []
    if settings.mcp_servers:  # the SDK (and what it imports) loads only when a server is configured
        from toolchain_service.tools.mcp import start_mcp_servers  # noqa: PLC0415

        mcp_servers = await start_mcp_servers(settings.mcp_servers)
    try:
        offered = select_tools(settings.tools, [local, *(server.tools for server in mcp_servers)])
    except BaseException:
        offered = []
        for server in mcp_servers:
            await server.aclose()
        raise
    finally:
        for tool in local:  # those not offered; the offered ones are the registry's to close
            if tool not in offered:
                await tool.aclose()
    tool_registry = ToolRegistry(offered, settings.tools)
    try:
        return await _start(settings, backend_registry, tool_registry, mcp_servers, observer, tracer_provider)
    except BaseException:
        await tool_registry.aclose()
        for server in mcp_servers:
            await server.aclose()
        raise


async def _start(
    settings: Settings,
    backend_registry: BackendRegistry,
    tool_registry: ToolRegistry,
    mcp_servers: list[McpServer],
    observer: StageObserver | None,
    tracer_provider: Any,
) -> RunningServer:
    observer = observer or StageObserver(
        log_prompts=settings.log_prompts, default_backend=settings.default_backend
    )
    observer.metrics.watch_queues(backend_registry.all())
    if backend_registry.budget is not None:
        observer.metrics.watch_budget(backend_registry.budget)
    stages = StageManager(
        settings.max_concurrent_stages,
        settings.cluster.resume_grace_seconds,
        settings.admission_max_loop_busy,
        backend_registry.budget,
    )
    servicer = ToolchainServicer(StageRunner(backend_registry, tool_registry), stages, settings, observer)

    interceptors: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]  # grpc-stubs' generic
    if settings.auth.enabled:
        exempt = EXEMPT_PREFIXES + (REFLECTION_PREFIXES if settings.auth.public_reflection else ())
        interceptors.append(BearerAuthInterceptor(settings.auth.load_tokens(), exempt))
        if not settings.tls.enabled:
            log.warning("bearer tokens travel in plaintext: configure tls.cert_file and tls.key_file")
    if settings.log_prompts:
        log.warning("log_prompts is on: prompts go into the logs (a debugging aid, not for production)")
    interceptors.append(DecodeGuard())  # last: undecodable requests -> INVALID_ARGUMENT, after auth
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),  # workers share the port
        ],
    )
    pb_grpc.add_ToolchainServiceServicer_to_server(servicer, server)
    health = grpc_health.aio.HealthServicer()  # type: ignore[attr-defined]  # the public alias of _async, not re-exported for mypy
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.reflection:
        reflection.enable(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    port = _listen(server, settings)
    await backend_registry.start()
    running = RunningServer(
        server,
        port,
        settings,
        servicer,
        stages,
        backend_registry,
        tool_registry,
        health,
        observer,
        mcp_servers=mcp_servers,
    )
    try:
        if settings.cluster.enabled:  # before the port opens: stages register from the first
            servicer.cluster = await _join_cluster(settings, stages)
        if settings.metrics_address:
            running.metrics = await asyncio.to_thread(_start_metrics, observer, settings.metrics_address)
        if settings.tracing:
            tracing.enable(tracer_provider)
            running.tracing = True
        await server.start()
        await running.refresh_health()
        running.watch_backends()
        for listeners in running._state_listeners():
            listeners.append(running.schedule_health_refresh)
    except BaseException:
        await running.stop(0)
        raise
    log.info(
        "toolchain server listening on %s (%s%s)",
        running.address,
        "mTLS" if settings.tls.client_ca_file else "TLS" if settings.tls.enabled else "plaintext",
        ", bearer auth" if settings.auth.enabled else "",
    )
    if running.metrics is not None:
        log.info("metrics on %s", running.metrics.url)
    log.info("tools: %s", ", ".join(f"{t.name} ({t.source})" for t in tool_registry.tools()) or "none")
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain. Prints `toolchain server listening on
    HOST:PORT` (and `toolchain metrics on URL`) on stdout once serving.

    Logging is configured from the settings unless the caller configured it already
    (the root logger has handlers)."""
    if not logging.getLogger().handlers:
        configure_logging(settings.log_format, settings.log_level, log_prompts=settings.log_prompts)
    shutdown_tracing: Callable[[], None] | None = None
    if settings.tracing:
        shutdown_tracing = tracing.install_sdk_from_env()
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"toolchain server listening on {running.address}", flush=True)
    if running.metrics is not None:
        print(f"toolchain metrics on {running.metrics.url}", flush=True)
    try:
        await stop.wait()
        log.info("shutting down: draining for up to %.1fs", settings.shutdown_grace)
        await running.drain()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if shutdown_tracing is not None:
            await asyncio.to_thread(shutdown_tracing)
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    if leftover:  # grpc's own call tasks may still be closing the calls that just ended
        _, pending = await asyncio.wait(leftover, timeout=1.0)
        if pending:
            log.warning("%d tasks still running at exit: %s", len(pending), [t.get_name() for t in pending])
    log.info("server stopped")
