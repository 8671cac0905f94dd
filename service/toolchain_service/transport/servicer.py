"""ToolchainService: six thin doors onto one stage runner.

The streaming RPCs number the runner's events and write them; the unary RPCs fold the
same events into one response. Both end the call with the status that matches the
terminal event: OK after Done, the error's code after Error, CANCELLED (or
DEADLINE_EXCEEDED) after Cancel. A client that goes away cancels the handler task; the
CancelledError unwinds the runner (closing the backend request and cancelling tools)
and propagates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, NoReturn, TypeVar

import grpc
from google.protobuf import struct_pb2
from toolchain_proto.v1 import toolchain_pb2 as pb
from toolchain_proto.v1 import toolchain_pb2_grpc as pb_grpc

from toolchain_service.config import Settings
from toolchain_service.errors import (
    NotFoundError,
    NotOwned,
    ReaderStalled,
    RegistryUnavailable,
    ResumeNotConfigured,
    StageError,
)
from toolchain_service.events import CancelEvent, CancelReason, DoneEvent, ErrorEvent, StageEvent, StageSpec
from toolchain_service.observe import StageObserver, StageRecord
from toolchain_service.relay import Relay
from toolchain_service.runner import StageRunner
from toolchain_service.stages import PRESSURE_STALL, WRITE_GRACE, StageHandle, StageManager, not_running
from toolchain_service.transport import convert
from toolchain_service.transport.auth import principal
from toolchain_service.transport.decoding import Undecodable, accepts_undecodable
from toolchain_service.transport.requests import parse_stage, rejected_stage_id
from toolchain_service.transport.status import cancel_status, event_status, grpc_status

if TYPE_CHECKING:
    from toolchain_service.cluster.registry import Cluster, StageEntry

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
StreamResponse = TypeVar("StreamResponse", pb.StreamToolsResponse, pb.StreamSynthesisResponse)
Out = TypeVar("Out")

#: The server's own deadline timer fires this much (at most a tenth of the time) before
#: the call's deadline, so that the Cancel event and the status can still go out: at the
#: deadline itself grpc ends the call, and whatever the server sends then fails.
_DEADLINE_MARGIN = 0.05

_CANCEL_MESSAGES = {
    CancelReason.CANCEL_STAGE: "cancelled by CancelStage",
    CancelReason.DEADLINE: "the call's deadline passed",
    CancelReason.SHUTDOWN: "the server is shutting down",
    CancelReason.DISCONNECTED: "the connection dropped and no ResumeStage came within the grace period",
    CancelReason.READER_STALLED: "the stream's reader stopped reading",
}
#: Events a logged stage may run ahead of its live stream before it waits (cluster mode).
_RELAY_EVENTS = 64
_TERMINALS = frozenset(("done", "cancel", "error"))


def _expired(context: Context) -> bool:
    """Whether the call's own deadline has passed (grpc then ends the call itself)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _ended(context: Context) -> bool:
    """Whether grpc has ended the call: its deadline passed, or the client cancelled it (at
    the client's own deadline too, which comes a little before the server's): a write that
    fails then fails for that reason, not for one of ours."""
    return _expired(context) or context.cancelled()


async def _write(context: Context, write: Callable[[Out], Awaitable[None]], message: Out) -> None:
    """`write(message)`; a write grpc refused is the caller gone (CancelledError).

    grpc fails a pending write when the call ends under it: the client cancelled it, or its
    deadline (which comes a little before the server's) passed. grpc may tell the handler
    so (`context.cancelled()`) only a loop turn later, so the failure itself is the signal:
    nothing of ours makes a write fail (the messages are ours and always serialize), except
    a write after the handler itself ended the call (UsageError): that is a bug, raised."""
    try:
        await write(message)
    except grpc.aio.UsageError:
        raise
    except Exception as exc:
        told = "" if _ended(context) else " (grpc has not said so yet)"
        log.debug("a write failed (%s): the call has ended%s", type(exc).__name__, told)
        raise asyncio.CancelledError from None  # the call ended mid-write


def _take_back_cancellation() -> None:
    """The door answers a cancellation of its own (CancelStage, the deadline, a stall):
    the task must not stay marked as cancelled."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _response(
    response_type: Callable[[], StreamResponse], stage_id: str, sequence: int, event: StageEvent
) -> StreamResponse:
    response = response_type()
    convert.fill_event(response.event, stage_id, sequence, event)
    return response


class ToolchainServicer(pb_grpc.ToolchainServiceServicer):
    def __init__(
        self,
        runner: StageRunner,
        stages: StageManager,
        settings: Settings,
        observer: StageObserver,
        cluster: Cluster | None = None,
    ) -> None:
        self.runner = runner
        self.stages = stages
        self.settings = settings
        self.observer = observer
        #: The replicas' shared registry and event logs (cluster.redis_url), or None.
        self.cluster = cluster
        #: The callers' identities count only when the server checks them.
        self._owned = settings.auth.enabled or bool(settings.tls.client_ca_file)
        #: Stage tasks of logged streams (they may outlive their calls).
        self._producers: set[asyncio.Task[None]] = set()

    # -- the four stage doors -------------------------------------------------------

    async def RunTools(self, request: pb.RunToolsRequest, context: Context) -> pb.RunToolsResponse:
        fold = await self._unary(request.stage, context, "RunTools", synthesis=False)
        return fold.tools_response()

    async def RunSynthesis(
        self, request: pb.RunSynthesisRequest, context: Context
    ) -> pb.RunSynthesisResponse:
        fold = await self._unary(request.stage, context, "RunSynthesis", synthesis=True)
        return fold.synthesis_response()

    # The streaming doors write with context.write instead of being async generators, so
    # that a cancellation always lands in code that can answer it with a Cancel event.
    # A request that does not decode (decoding.py) still gets its terminal Error event.
    @accepts_undecodable
    async def StreamTools(  # type: ignore[override]
        self, request: pb.StreamToolsRequest | Undecodable, context: Context
    ) -> None:
        stage = request if isinstance(request, Undecodable) else request.stage
        await self._stream(stage, context, "StreamTools", pb.StreamToolsResponse, synthesis=False)

    @accepts_undecodable
    async def StreamSynthesis(  # type: ignore[override]
        self, request: pb.StreamSynthesisRequest | Undecodable, context: Context
    ) -> None:
        stage = request if isinstance(request, Undecodable) else request.stage
        await self._stream(stage, context, "StreamSynthesis", pb.StreamSynthesisResponse, synthesis=True)

    # -- the other RPCs ------------------------------------------------------------

    async def CancelStage(self, request: pb.CancelStageRequest, context: Context) -> pb.CancelStageResponse:
        caller = self._principal(context)
        try:
            await self._cancel(request.stage_id, caller)
        except StageError as exc:
            await self._abort(context, exc)
        return pb.CancelStageResponse(stage_id=request.stage_id)

    async def _cancel(self, stage_id: str, caller: str) -> None:
        if self.cluster is None or self.stages.get(stage_id) is not None:
            self.stages.cancel(stage_id, caller)
            return
        entry = await self.cluster.lookup(stage_id)
        if entry is None or not entry.running or entry.principal != caller:
            raise not_running(stage_id, caller)
        if not await self.cluster.ask(entry.replica, "cancel", stage_id):
            raise not_running(stage_id, caller)

    async def ResumeStage(  # type: ignore[override]
        self, request: pb.ResumeStageRequest, context: Context
    ) -> None:
        caller = self._principal(context)
        stage_id = request.stage_id
        after = request.after_sequence if request.HasField("after_sequence") else None
        expected = 0 if after is None else after + 1
        terminal: pb.StageEvent | None = None
        try:
            if self.cluster is None:
                raise ResumeNotConfigured(
                    "this server keeps no event logs to resume from: resuming needs the replicas' "
                    "shared registry (cluster.redis_url)"
                )
            cluster = self.cluster
            entry = await cluster.lookup(stage_id)
            if entry is None or not entry.streamed or entry.principal != caller:
                if caller:
                    raise NotOwned(f"no stage of yours with stage_id {stage_id!r} can be resumed")
                raise NotFoundError(
                    f"no streamed stage with stage_id {stage_id!r} has its events kept (it never ran, "
                    "was not streamed, or ended more than cluster.event_log_ttl_seconds ago)"
                )
            attached = entry.running and await self._attach(cluster, entry)
            try:
                async with aclosing(cluster.follow(entry, after)) as events:
                    async for logged in events:
                        response = pb.ResumeStageResponse()
                        response.event.ParseFromString(logged.data)
                        await _write(context, context.write, response)
                        expected = logged.sequence + 1
                        if response.event.WhichOneof("event") in _TERMINALS:
                            terminal = response.event
                            break
            finally:
                if attached:
                    cluster.tell(entry.replica, "detach", stage_id)
        except StageError as exc:
            error = pb.ResumeStageResponse()
            convert.fill_event(error.event, stage_id, expected, ErrorEvent(exc))
            await context.write(error)
            await self._abort(context, exc)
        assert terminal is not None
        which = terminal.WhichOneof("event")
        if which == "cancel":
            code, details = cancel_status(CancelReason(terminal.cancel.reason))
            await context.abort(code, details)
        elif which == "error":
            status = event_status(terminal.error)
            await context.abort(status.code, status.details, status.trailing_metadata)

    async def ListTools(self, request: pb.ListToolsRequest, context: Context) -> pb.ListToolsResponse:
        response = pb.ListToolsResponse()
        for tool in self.runner.tools.tools():
            schema = struct_pb2.Struct()
            schema.update(tool.parameters_schema())
            response.tools.add(
                name=tool.name,
                description=tool.description,
                parameters_schema=schema,
                timeout=convert.duration(self.runner.tools.timeout_of(tool)),
                source=tool.source,
            )
        return response

    # -- shared machinery ------------------------------------------------------------

    @staticmethod
    async def _attach(cluster: Cluster, entry: StageEntry) -> bool:
        """Tell the stage's owner that a resumed stream follows it (its grace period stops).
        An owner that does not answer is not waited for: following its log finds out
        whether it is gone."""
        try:
            return await cluster.ask(entry.replica, "attach", entry.stage_id) is True
        except RegistryUnavailable:
            return False

    def _principal(self, context: Context) -> str:
        if not self._owned:
            return ""
        return principal(context.invocation_metadata(), context.auth_context())

    async def _open(
        self, stage: pb.StageRequest, context: Context, rpc: str, *, synthesis: bool, stream: bool
    ) -> tuple[StageSpec, StageHandle, AsyncGenerator[StageEvent, None]]:
        spec = parse_stage(stage, self.settings, synthesis=synthesis, stream=stream)
        handle = self.stages.open(spec.stage_id, self._principal(context))
        # The caller's deadline, at most max_deadline_seconds; default_deadline_seconds when none.
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self.settings.default_deadline_seconds
        else:
            remaining = min(remaining, self.settings.max_deadline_seconds)
        if self.cluster is not None:
            try:
                await self.cluster.register(spec.stage_id, handle.principal, remaining, streamed=stream)
            except BaseException:
                self.stages.close(handle)
                raise
            handle.shared = True
        handle.cancel_at_deadline(remaining - min(_DEADLINE_MARGIN, remaining / 10))
        deadline = time.monotonic() + remaining
        return spec, handle, self.runner.run(spec, deadline)

    async def _abort(self, context: Context, exc: StageError) -> NoReturn:
        status = grpc_status(exc)
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("abort returned")  # pragma: no cover

    async def _stream(
        self,
        stage: pb.StageRequest | Undecodable,
        context: Context,
        rpc: str,
        response_type: Callable[[], StreamResponse],
        *,
        synthesis: bool,
    ) -> None:
        write: Callable[[StreamResponse], Awaitable[None]] = context.write
        record = self.observer.start(rpc, context.invocation_metadata)
        try:
            if isinstance(stage, Undecodable):
                raise stage.error
            spec, handle, events = await self._open(stage, context, rpc, synthesis=synthesis, stream=True)
        except StageError as exc:
            record.finish_error(exc)
            await write(_response(response_type, rejected_stage_id(stage), 0, ErrorEvent(exc)))
            await self._abort(context, exc)
        except BaseException:
            record.close()
            raise
        record.spec = spec
        if self.cluster is not None:
            await self._stream_logged(spec, handle, events, record, context, response_type)
            return
        sequence = 0
        terminal: StageEvent | None = None
        # A cancellation waits for a write in progress (StageHandle.written). One that lands
        # in a write anyway (a reader that does not read held it back) leaves that write
        # pending in grpc: no Cancel event can follow it, only the status, which goes out
        # behind it; past the deadline grpc has ended the call itself.
        try:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, DoneEvent | ErrorEvent):
                        handle.finish()  # from here on nothing may cancel the stage
                        terminal = event
                    record.event(event)
                    handle.writing = time.monotonic()
                    await _write(context, write, _response(response_type, spec.stage_id, sequence, event))
                    sequence += 1
                    handle.written()
            if isinstance(terminal, ErrorEvent):
                record.finish_error(terminal.error)
            else:
                record.finish_done()
        except asyncio.CancelledError:
            reason = self._uncancel(handle)
            if reason == CancelReason.CLIENT:
                record.finish_cancel(CancelReason.DEADLINE if _expired(context) else reason)
                raise
            record.finish_cancel(reason)
            if _expired(context) or (handle.writing and reason == CancelReason.DEADLINE):
                raise  # grpc has ended the call (or will, at the deadline): nothing can go out
            cancel = CancelEvent(reason, _CANCEL_MESSAGES[reason])
            code, details = cancel_status(reason)
            try:
                if not handle.writing:
                    await write(_response(response_type, spec.stage_id, sequence, cancel))
            finally:
                self.stages.close(handle)
            if reason == CancelReason.READER_STALLED:
                await self._abort(context, self._stalled(handle))
            await context.abort(code, details)
        finally:
            self.stages.close(handle)
            record.close()
        if isinstance(terminal, ErrorEvent):
            await self._abort(context, terminal.error)

    def _stalled(self, handle: StageHandle) -> ReaderStalled:
        if handle.pressed:
            return ReaderStalled(
                f"the stream's reader did not read for {PRESSURE_STALL:g}s while the server's stream "
                "buffers were full (max_buffered_bytes), so the server stopped the stream to free them; "
                "read events as they come"
            )
        return ReaderStalled(
            f"the stream's reader did not read for {self.settings.stream_stall_seconds:g}s "
            "(stream_stall_seconds), so the server stopped the stream; read events as they come"
        )

    async def _stream_logged(
        self,
        spec: StageSpec,
        handle: StageHandle,
        events: AsyncGenerator[StageEvent, None],
        record: StageRecord,
        context: Context,
        response_type: Callable[[], StreamResponse],
    ) -> None:
        """A stream whose stage runs in a task of its own and logs every event: when the
        connection drops, the stage goes on (for the resume grace period, or until a
        ResumeStage follows it) instead of ending with the call."""
        relay: Relay[tuple[StageEvent, StreamResponse]] = Relay(_RELAY_EVENTS, WRITE_GRACE)
        handle.relay = relay
        handle.attach()
        producer = asyncio.get_running_loop().create_task(
            self._produce(spec, handle, events, record, relay, response_type),
            name=f"toolchain-stage-{spec.stage_id[:40]}",
        )
        handle.task = producer
        self._producers.add(producer)
        producer.add_done_callback(self._producers.discard)
        try:
            while True:
                event, response = await relay.get()
                relay.writing = time.monotonic()
                await _write(context, context.write, response)
                relay.written()
                if isinstance(event, DoneEvent | ErrorEvent | CancelEvent):
                    break
        except asyncio.CancelledError:
            if relay.forced:  # the stage ended while its reader did not read: status alone
                _take_back_cancellation()
                assert relay.last is not None
                event = relay.last[0]
            else:
                relay.detach()
                handle.detach(self.stages.resume_grace)
                if not relay.stalled:
                    raise
                # the reader stopped reading: it goes, the stage goes on (resumable)
                _take_back_cancellation()
                await self._abort(context, self._stalled(handle))
        except EOFError:
            await self._abort(context, StageError("the stage ended without a terminal event; this is a bug"))
        finally:
            relay.written()
        if _expired(context):
            return
        if isinstance(event, CancelEvent):
            code, details = cancel_status(event.reason)
            await context.abort(code, details)
        elif isinstance(event, ErrorEvent):
            await self._abort(context, event.error)

    async def _produce(
        self,
        spec: StageSpec,
        handle: StageHandle,
        events: AsyncGenerator[StageEvent, None],
        record: StageRecord,
        relay: Relay[tuple[StageEvent, StreamResponse]],
        response_type: Callable[[], StreamResponse],
    ) -> None:
        """Run the stage: log each event and hand it to the live stream, if any."""
        cluster = self.cluster
        assert cluster is not None
        sequence = 0

        def emit(event: StageEvent) -> tuple[StageEvent, StreamResponse]:
            nonlocal sequence
            response = _response(response_type, spec.stage_id, sequence, event)
            cluster.append(spec.stage_id, sequence, response.event.SerializeToString())
            sequence += 1
            return event, response

        try:
            terminal: StageEvent | None = None
            try:
                async with aclosing(events):
                    async for event in events:
                        if isinstance(event, DoneEvent | ErrorEvent):
                            handle.finish()
                            terminal = event
                            relay.put_nowait(emit(event))
                        else:
                            await relay.put(emit(event))
                        record.event(event)
            except asyncio.CancelledError:
                reason = handle.reason
                if reason == CancelReason.UNSPECIFIED:
                    raise  # not a cancellation of ours: the loop is closing
                handle.finish()
                _take_back_cancellation()
                record.finish_cancel(reason)
                relay.put_nowait(emit(CancelEvent(reason, _CANCEL_MESSAGES[reason])))
                return
            if isinstance(terminal, ErrorEvent):
                record.finish_error(terminal.error)
            else:
                record.finish_done()
        finally:
            self.stages.close(handle)
            record.close()
            relay.close()

    async def _unary(
        self, stage: pb.StageRequest, context: Context, rpc: str, *, synthesis: bool
    ) -> convert.Fold:
        record = self.observer.start(rpc, context.invocation_metadata)
        try:
            spec, handle, events = await self._open(stage, context, rpc, synthesis=synthesis, stream=False)
        except StageError as exc:
            record.finish_error(exc)
            await self._abort(context, exc)
        except BaseException:
            record.close()
            raise
        record.spec = spec
        fold = convert.Fold(spec.stage_id)
        try:
            async with aclosing(events):
                async for event in events:
                    if isinstance(event, DoneEvent | ErrorEvent):
                        handle.finish()
                    record.event(event)
                    if isinstance(event, ErrorEvent):
                        record.finish_error(event.error)
                        await self._abort(context, event.error)
                    fold.add(event)
            record.finish_done()
        except asyncio.CancelledError:
            reason = self._uncancel(handle)
            if reason == CancelReason.CLIENT:
                record.finish_cancel(CancelReason.DEADLINE if _expired(context) else reason)
                raise
            record.finish_cancel(reason)
            self.stages.close(handle)
            if _expired(context):
                raise  # grpc has ended the call: nothing can go out
            code, details = cancel_status(reason)
            await context.abort(code, details)
        finally:
            self.stages.close(handle)
            record.close()
        return fold

    @staticmethod
    def _uncancel(handle: StageHandle) -> CancelReason:
        """Who cancelled: our own cancellations are taken back so the door can report them."""
        handle.finish()
        if handle.reason == CancelReason.UNSPECIFIED:
            return CancelReason.CLIENT
        _take_back_cancellation()
        return handle.reason
