"""Python client of the toolchain.v1 gRPC service (asyncio and blocking), plus renderers.

Usage::

    import asyncio
    from toolchain_client import PhaseOptions, ToolchainClient, format_done, format_tool_table

    async def main() -> None:
        async with ToolchainClient("127.0.0.1:50051", timeout=60) as client:
            async for event in client.stream_synthesis("What is 17 * 23?", tools=["calculator"],
                                                        synthesis_phase=PhaseOptions(max_tokens=128)):
                if event.HasField("chunk"): print(event.chunk.content, end="", flush=True)
                elif event.HasField("tool_summary"): print(format_tool_table(event.tool_summary.results))
                elif event.HasField("done"): print(format_done(event.done))

    asyncio.run(main())

Failures raise `grpc.RpcError` (`grpc.aio.AioRpcError` in asyncio); `error_details(err)`
decodes the server's reason, field violations and retry delay. `SyncToolchainClient` has
the same methods, blocking. `pb` is the generated messages module (toolchain_pb2).
"""

import os

# gRPC's C core (grpcio 1.85) logs at INFO unless told otherwise, e.g. "skipping fork()
# handlers" each time `serve` starts the embedded model's process. Errors still show; set
# GRPC_VERBOSITY yourself to see more. Read when grpc is first imported, hence here.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from toolchain_proto.v1 import toolchain_pb2 as pb

from toolchain_client.aio import (
    ErrorDetails,
    PhaseOptions,
    ToolchainClient,
    build_stage,
    error_details,
    status_code_name,
)
from toolchain_client.render import (
    event_to_json,
    format_cancel,
    format_done,
    format_error,
    format_tool_table,
    format_tools,
    message_to_json,
    outcome_word,
)
from toolchain_client.sync import SyncToolchainClient

__all__ = [
    "ErrorDetails",
    "PhaseOptions",
    "SyncToolchainClient",
    "ToolchainClient",
    "build_stage",
    "error_details",
    "event_to_json",
    "format_cancel",
    "format_done",
    "format_error",
    "format_tool_table",
    "format_tools",
    "message_to_json",
    "outcome_word",
    "pb",
    "status_code_name",
]
