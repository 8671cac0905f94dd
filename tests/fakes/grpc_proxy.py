"""A real nginx (Debian's package; `.ci/setup` installs it) as a gRPC load balancer in
front of replicas, for the deployment tests: `grpc_pass` to an `upstream` of the replica
addresses (round robin, keepalive connections), on a free loopback port with HTTP/2.

Everything lives in a temporary prefix directory: the generated nginx.conf, the pid
file, the temp paths and the error log (notice level, so a reload and a shutdown can be
followed in it; `log_text` shows it when a test fails). It runs in the foreground
(`daemon off`) with a master and one worker, so that

* `restart()` stops it (SIGTERM: fast shutdown, every client and upstream connection is
  cut) and starts it again on the same port, as a crashed or redeployed proxy does;
* `reload(upstreams)` rewrites the upstream list, checks it (`nginx -t`) and sends SIGHUP:
  a new worker takes new connections, the old one finishes its open streams;
* `stop()` checks how it ended: exit status 0, else the test fails with the error log.

As root, nginx's worker would switch to `nobody` (and could not read the prefix), so the
config says `user root;` then; as any other user no `user` directive is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.redis_server import free_port
from tests.fakes.server_process import run_to_end

#: Where Debian puts it when /usr/sbin is not on PATH.
_CANDIDATES = ("nginx", "/usr/sbin/nginx")

#: Error log levels that fail the test that ran the proxy.
_SERIOUS = ("alert", "crit", "emerg")

#: The worker processes; `reload` waits for this many old ones to begin shutting down.
_WORKERS = 1


def nginx_binary() -> str:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("nginx is not installed: run .ci/setup (apt-get install nginx)")


def render_config(prefix: Path, port: int, upstreams: Sequence[str], *, keepalive: int = 32) -> str:
    """nginx.conf for a gRPC proxy on 127.0.0.1:`port` in front of `upstreams` (HOST:PORT).

    Round robin over the replicas, in turn for every request (`max_fails=0`: a replica
    that refused a connection is not set aside for a while, which would skew the turns).
    `grpc_next_upstream error timeout` (nginx's default): a refused or failed connection
    to one replica is retried on the next. nginx 1.22 has no condition for a gRPC status:
    one (UNAVAILABLE included) comes in a 200 response's headers or trailers, and nginx
    retries on HTTP statuses only, so a replica's UNAVAILABLE reaches the caller."""
    if not upstreams:
        raise ValueError("a gRPC proxy needs at least one upstream")
    user = "user root;\n" if os.geteuid() == 0 else ""
    servers = "".join(f"        server {address} max_fails=0;\n" for address in upstreams)
    temp = "".join(
        f"    {name}_temp_path {prefix / 'temp' / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}"
        "daemon off;\n"
        "master_process on;\n"
        f"worker_processes {_WORKERS};\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"lock_file {prefix / 'nginx.lock'};\n"
        f"error_log {prefix / 'error.log'} notice;\n"
        "events {\n"
        "    worker_connections 1024;\n"
        "}\n"
        "http {\n"
        # One line per request: which replica served it (a retry lists each one tried).
        "    log_format grpc escape=json '$uri\\t$http_x_stage_id\\t$upstream_addr\\t$status\\t'\n"
        "        '$upstream_http_grpc_status\\t$upstream_trailer_grpc_status';\n"
        f"    access_log {prefix / 'access.log'} grpc;\n"
        f"{temp}"
        # Client side: many streams and requests on one HTTP/2 connection, never timed out
        # while a stream waits for its next event.
        "    keepalive_requests 1000000;\n"
        "    keepalive_timeout 300s;\n"
        "    http2_max_concurrent_streams 1024;\n"
        "    client_body_timeout 300s;\n"
        "    send_timeout 300s;\n"
        "    upstream replicas {\n"
        f"{servers}"
        f"        keepalive {keepalive};\n"
        "        keepalive_requests 1000000;\n"
        "        keepalive_timeout 300s;\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port} http2;\n"
        "        location / {\n"
        "            grpc_pass grpc://replicas;\n"
        "            grpc_read_timeout 300s;\n"
        "            grpc_send_timeout 300s;\n"
        "            grpc_next_upstream error timeout;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


@dataclass(frozen=True)
class ProxiedRequest:
    """An access log line: the gRPC method, the caller's `x-stage-id` metadata, every
    replica nginx tried (a retry lists each), the HTTP status and the gRPC status (from
    the response headers or, for a response with messages, the trailers)."""

    method: str
    stage_id: str
    upstreams: tuple[str, ...]
    http_status: int
    grpc_status: str

    @property
    def upstream(self) -> str:
        """The replica that answered (the last one tried)."""
        return self.upstreams[-1] if self.upstreams else ""

    @classmethod
    def parse(cls, line: str) -> ProxiedRequest:
        uri, stage_id, upstreams, status, header_status, trailer_status = line.split("\t")
        return cls(
            uri.rsplit("/", 1)[-1],
            stage_id,
            tuple(u.strip() for u in upstreams.replace(" : ", ", ").split(",") if u.strip()),
            int(status),
            header_status or trailer_status,
        )


@dataclass
class GrpcProxy:
    upstreams: list[str]
    port: int
    workdir: tempfile.TemporaryDirectory[str]
    process: asyncio.subprocess.Process | None = None
    output: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def prefix(self) -> Path:
        return Path(self.workdir.name)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def requests(self) -> list[ProxiedRequest]:
        """The access log so far: one entry per request that ended."""
        with contextlib.suppress(OSError):
            lines = self.access_log.read_text(errors="replace").splitlines()
            return [ProxiedRequest.parse(line) for line in lines if line]
        return []

    def log_text(self) -> str:
        """The error log so far, and what nginx printed on stdout/stderr."""
        with contextlib.suppress(OSError):
            text = self.error_log.read_text(errors="replace")
            return text + "".join(self.output)
        return "".join(self.output)

    def _count(self, needle: str) -> int:
        with contextlib.suppress(OSError):
            return self.error_log.read_text(errors="replace").count(needle)
        return 0

    def _write_config(self) -> None:
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.prefix, self.port, self.upstreams))

    def _command(self, *extra: str) -> tuple[str, ...]:
        prefix = str(self.prefix)
        return (nginx_binary(), "-p", prefix, "-c", str(self.config_path), "-e", str(self.error_log), *extra)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            self.output.append(line.decode(errors="replace"))

    async def start(self, timeout: float = 20.0) -> bool:
        """Start nginx on `port` and wait until it accepts connections. False when it
        exited first (the port taken between the probe and the bind); the log says why."""
        if self.process is not None and self.process.returncode is None:
            raise RuntimeError("the proxy is already running")
        self._write_config()
        self.process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        return await self._accepts(timeout)

    async def _accepts(self, timeout: float) -> bool:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end and self.process.returncode is None:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                # Ours only if nginx is still up: it bound the port, nothing else can.
                return self.process.returncode is None
            await asyncio.sleep(0.05)
        if self.process.returncode is None:
            raise AssertionError(f"nginx did not listen within {timeout}s:\n{self.log_text()}")
        await self._end_reader()
        return False

    async def _end_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def stop(self, timeout: float = 20.0, *, graceful: bool = False) -> None:
        """SIGTERM (fast shutdown: every connection cut) or, `graceful`, SIGQUIT (open
        streams finish first); then the exit status must be 0 (SIGKILL and a failure
        after `timeout`)."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            process.send_signal(signal.SIGQUIT if graceful else signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                code = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"nginx did not stop within {timeout}s:\n{self.log_text()}") from None
        finally:
            await self._end_reader()
        if code != 0:
            raise AssertionError(f"nginx ended with status {code}:\n{self.log_text()}")

    async def restart(self, timeout: float = 20.0) -> None:
        """Stop (fast: cuts every client connection and every upstream one) and start
        again on the same port."""
        await self.stop(timeout)
        if not await self.start(timeout):
            raise AssertionError(f"nginx did not start again on port {self.port}:\n{self.log_text()}")

    async def reload(self, upstreams: Sequence[str], timeout: float = 20.0) -> None:
        """Point the proxy at `upstreams`: the new config is checked (`nginx -t`), then
        SIGHUP; returns once the old worker stopped accepting connections, so every new
        connection goes to a worker with the new upstream list. Streams already open
        finish on the old worker."""
        process = self.process
        if process is None or process.returncode is not None:
            raise RuntimeError("the proxy is not running")
        self.upstreams = list(upstreams)
        self._write_config()
        code, out, err = await run_to_end(*self._command("-t"), timeout=timeout)
        if code != 0:
            raise AssertionError(f"nginx -t refused the new config ({code}):\n{out}{err}")
        before = self._count("gracefully shutting down")
        started = self._count("start worker process ")
        process.send_signal(signal.SIGHUP)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (
            self._count("gracefully shutting down") < before + _WORKERS
            or self._count("start worker process ") < started + _WORKERS
        ):
            if loop.time() > end or process.returncode is not None:
                raise AssertionError(f"nginx did not reload within {timeout}s:\n{self.log_text()}")
            await asyncio.sleep(0.05)


async def start_grpc_proxy(upstreams: Sequence[str], timeout: float = 20.0) -> GrpcProxy:
    """nginx on a free loopback port in front of `upstreams`, accepting connections."""
    workdir = tempfile.TemporaryDirectory(prefix="toolchain-nginx-")
    proxy = GrpcProxy(list(upstreams), 0, workdir)
    for _attempt in range(5):  # the free port can be taken between the probe and the bind
        proxy.port = free_port()
        if await proxy.start(timeout):
            return proxy
    log = proxy.log_text()
    workdir.cleanup()
    raise RuntimeError(f"nginx did not start:\n{log}")


async def close_grpc_proxy(proxy: GrpcProxy) -> None:
    """Stop it (the exit status must be 0, its log free of alerts) and remove its directory."""
    try:
        await proxy.stop()
        log = proxy.log_text()
        serious = [line for line in log.splitlines() if any(f"[{level}]" in line for level in _SERIOUS)]
        assert not serious, f"nginx logged {serious[:5]}:\n{log}"
    finally:
        proxy.workdir.cleanup()
