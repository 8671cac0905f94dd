"""The service under test, in its own process, as production runs it (uvloop, INFO logs).

    python -m bench.service_proc --backend-url http://127.0.0.1:PORT/v1   # prints "READY <port>"

It calls `start_server` with production settings pointed at the fake backend, logs
through the CLI's own `configure_logging` (one JSON stage line per stage at INFO, on
stderr, which the benchmark sends to a file), and serves until SIGTERM or, under
`bench.run`, until its stdin closes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bench import common, scenario


async def _serve(args: argparse.Namespace) -> int:
    from toolchain_service.logs import configure_logging
    from toolchain_service.transport.server import start_server

    configure_logging(args.log_format, args.log_level)
    settings = scenario.service_settings(args.backend_url, args.max_connections, args.pace_url)
    running = await start_server(settings)
    common.announce(f"READY {running.port}")
    await common.wait_for_stop()
    await running.stop(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service_proc", description=__doc__.splitlines()[0])
    parser.add_argument("--backend-url", required=True, help="e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--pace-url", default=None, help="a second backend, named pace (bench.realrate)")
    parser.add_argument("--max-connections", type=int, default=None, help="backend pool; default: settings'")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    return common.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
