"""The ceiling: a grpc.aio server (its own process) that does no work at all.

    python -m bench.ceiling_proc --responses FILE   # prints "READY <port>"

It serves the four stage RPCs of toolchain.v1 with generic handlers that neither parse
the request nor serialise anything: each call is answered with the recorded bytes of a
real stage of that RPC (`bench.loadgen --record`), the same number of messages of the
same sizes, on uvloop like the service. Its throughput is what grpc.aio in Python can
do on this machine with these messages; no implementation of the service can beat it.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from bench import common

SERVICE = "toolchain.v1.ToolchainService"


def load(path: str) -> dict[str, list[bytes]]:
    with open(path, encoding="utf-8") as f:
        raw: dict[str, Any] = json.load(f)
    return {
        rpc: [base64.b64decode(m) for m in messages]
        for rpc, messages in raw.items()
        if isinstance(messages, list)
    }


def handlers(responses: dict[str, list[bytes]], style: str) -> grpc.GenericRpcHandler[bytes, bytes]:
    methods: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
    for rpc in ("RunTools", "RunSynthesis"):
        (payload,) = responses[rpc]

        def unary(payload: bytes) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Any]:
            async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
                return payload

            return handle

        methods[rpc] = grpc.unary_unary_rpc_method_handler(unary(payload))
    for rpc in ("StreamTools", "StreamSynthesis"):
        messages = tuple(responses[rpc])

        def generator(
            messages: tuple[bytes, ...],
        ) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
            async def handle(
                request: bytes, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[bytes]:
                for message in messages:
                    yield message

            return handle

        def writer(messages: tuple[bytes, ...]) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Any]:
            async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                for message in messages:
                    await context.write(message)

            return handle

        behaviour = generator(messages) if style == "generator" else writer(messages)
        methods[rpc] = grpc.unary_stream_rpc_method_handler(behaviour)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def _serve(args: argparse.Namespace) -> int:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handlers(load(args.responses), args.style),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    common.announce(f"READY {port}")
    await common.wait_for_stop()
    await server.stop(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling_proc", description=__doc__.splitlines()[0])
    parser.add_argument("--responses", required=True, help="file written by bench.loadgen --record")
    parser.add_argument(
        "--style",
        choices=("write", "generator"),
        default="write",
        help="stream with context.write (as the service does) or an async generator",
    )
    return common.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
