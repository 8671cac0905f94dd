"""Server bootstrap: build the parts from settings, serve, drain on SIGTERM/SIGINT.

    settings ─▶ BackendRegistry + ToolRegistry ─▶ StageRunner ─▶ ToolchainServicer
                                                              └▶ health, reflection

Drain: health turns NOT_SERVING, new stages get UNAVAILABLE, running stages get
`shutdown_grace` seconds to finish, then end with a Cancel event (reason SHUTDOWN).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from toolchain_service.backends.registry import BackendRegistry
from toolchain_service.config import Settings
from toolchain_service.events import CancelReason
from toolchain_service.observe import StageObserver
from toolchain_service.runner import StageRunner
from toolchain_service.stages import StageManager
from toolchain_service.tools.base import Tool
from toolchain_service.tools.builtin import builtin_tools
from toolchain_service.tools.registry import ToolRegistry
from toolchain_service.transport.servicer import ToolchainServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ToolchainService"].full_name
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
    health: HealthServicer
    observer: StageObserver

    @property
    def address(self) -> str:
        host = self.settings.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def set_health(self, status: Any) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking stages, let running ones finish within the grace period, cancel
        the rest with reason SHUTDOWN, then stop the server."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.stages.draining = True
        await self.set_health(NOT_SERVING)
        await self.stages.wait_idle(grace)
        cancelled = self.stages.cancel_all(CancelReason.SHUTDOWN)
        if cancelled:
            log.info("cancelled %d stages at shutdown", cancelled)
        await self.stages.wait_idle(2.0)  # the cancelled stages write their cancel events
        await self.stop(0.5)

    async def stop(self, grace: float | None = 0) -> None:
        await self.server.stop(grace)
        await self.backends.aclose()
        await self.tools.aclose()


async def start_server(
    settings: Settings,
    *,
    tools: list[Tool[Any]] | None = None,
    backends: BackendRegistry | None = None,
    observer: StageObserver | None = None,
) -> RunningServer:
    """Build and start a server on `settings.address` (port 0: a free port)."""
    backend_registry = backends or BackendRegistry.from_settings(settings.backends, settings.default_backend)
    tool_registry = ToolRegistry(builtin_tools(settings.tools) if tools is None else tools, settings.tools)
    observer = observer or StageObserver()
    stages = StageManager(settings.max_concurrent_stages)
    servicer = ToolchainServicer(StageRunner(backend_registry, tool_registry), stages, settings, observer)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_ToolchainServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(settings.address)
    await backend_registry.start()
    await server.start()
    running = RunningServer(
        server, port, settings, servicer, stages, backend_registry, tool_registry, health, observer
    )
    await running.set_health(SERVING if backend_registry.any_ready() else NOT_SERVING)
    log.info("toolchain server listening on %s", running.address)
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"toolchain server listening on {running.address}", flush=True)
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.shutdown_grace)
    await running.drain()
