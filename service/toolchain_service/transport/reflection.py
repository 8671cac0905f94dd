"""gRPC server reflection, v1 and v1alpha, serving the contract with its source comments.

grpcio-reflection serves only `grpc.reflection.v1alpha` and rebuilds each file from the
descriptor pool, which drops the comments, so `grpcurl describe` and `buf curl` would show
a bare contract. This servicer answers from `descriptors/contract.binpb`, the descriptor set
protos/generate.py writes with `--include_source_info --include_imports` (the toolchain.v1
files, google.rpc's error details and the well-known types, each as written), and from the
default pool for every other file the server links (health, reflection).

v1 and v1alpha are the same protocol under two package names: their messages are identical
field for field, so one implementation with grpcio-reflection's v1alpha message classes
answers both (clients pick v1 and fall back to v1alpha).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from grpc_reflection.v1alpha import reflection_pb2 as rpb

SERVICE_NAMES = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")
_METHOD = "ServerReflectionInfo"


def _contract_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    data = resources.files("toolchain_service.transport").joinpath("descriptors/contract.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f for f in files}


def _reflection_v1() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, derived from v1alpha's (the same messages under
    another package), so that clients can resolve the v1 service they talk to."""
    proto = descriptor_pb2.FileDescriptorProto()
    rpb.DESCRIPTOR.CopyToProto(proto)
    text = text_format.MessageToString(proto).replace("grpc.reflection.v1alpha", "grpc.reflection.v1")
    proto = text_format.Parse(text, descriptor_pb2.FileDescriptorProto())
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.options.Clear()
    return proto


class ReflectionService:
    """The ServerReflectionInfo stream: answers each request in order."""

    def __init__(self, service_names: Sequence[str]) -> None:
        self._service_names = tuple(sorted({*service_names, *SERVICE_NAMES}))
        self._commented = _contract_files()
        v1 = _reflection_v1()
        self._commented[v1.name] = v1
        self._pool = descriptor_pool.DescriptorPool()
        for proto in self._commented.values():  # dependencies first: the set is in that order
            self._pool.Add(proto)
        self._default = descriptor_pool.Default()

    def handlers(self) -> list[grpc.GenericRpcHandler]:  # type: ignore[type-arg]  # grpc-stubs' generic
        handler = grpc.stream_stream_rpc_method_handler(
            self.info,
            request_deserializer=rpb.ServerReflectionRequest.FromString,
            response_serializer=rpb.ServerReflectionResponse.SerializeToString,
        )
        return [grpc.method_handlers_generic_handler(name, {_METHOD: handler}) for name in SERVICE_NAMES]

    async def info(
        self,
        requests: AsyncIterator[rpb.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[rpb.ServerReflectionResponse]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        which = request.WhichOneof("message_request")
        try:
            if which == "list_services":
                return rpb.ServerReflectionResponse(
                    original_request=request,
                    list_services_response=rpb.ListServiceResponse(
                        service=[rpb.ServiceResponse(name=n) for n in self._service_names]
                    ),
                )
            if which == "file_by_filename":
                return self._files(request, request.file_by_filename)
            if which == "file_containing_symbol":
                return self._files(request, self._file_of_symbol(request.file_containing_symbol))
            if which == "file_containing_extension":
                ext = request.file_containing_extension
                return self._files(
                    request, self._file_of_extension(ext.containing_type, ext.extension_number)
                )
            if which == "all_extension_numbers_of_type":
                return self._extension_numbers(request, request.all_extension_numbers_of_type)
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, "not found")
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "unknown reflection request")

    # -- lookups: the commented contract first, then everything else the process links --

    def _file_of_symbol(self, symbol: str) -> str:
        for pool in (self._pool, self._default):
            try:
                return str(pool.FindFileContainingSymbol(symbol).name)
            except KeyError:
                continue
        raise KeyError(symbol)

    def _file_of_extension(self, containing_type: str, number: int) -> str:
        for pool in (self._pool, self._default):
            try:
                message = pool.FindMessageTypeByName(containing_type)
                extension = pool.FindExtensionByNumber(message, number)
                return str(pool.FindFileContainingSymbol(extension.full_name).name)
            except KeyError:
                continue
        raise KeyError(containing_type)

    def _extension_numbers(
        self, request: rpb.ServerReflectionRequest, containing_type: str
    ) -> rpb.ServerReflectionResponse:
        for pool in (self._pool, self._default):
            try:
                message = pool.FindMessageTypeByName(containing_type)
            except KeyError:
                continue
            numbers = sorted(e.number for e in pool.FindAllExtensions(message))
            return rpb.ServerReflectionResponse(
                original_request=request,
                all_extension_numbers_response=rpb.ExtensionNumberResponse(
                    base_type_name=message.full_name, extension_number=numbers
                ),
            )
        raise KeyError(containing_type)

    def _proto(self, name: str) -> descriptor_pb2.FileDescriptorProto:
        if name in self._commented:
            return self._commented[name]
        proto = descriptor_pb2.FileDescriptorProto()
        self._default.FindFileByName(name).CopyToProto(proto)
        return proto

    def _files(self, request: rpb.ServerReflectionRequest, name: str) -> rpb.ServerReflectionResponse:
        """The file and its transitive dependencies, the file first (as grpc's own servicer)."""
        ordered: list[descriptor_pb2.FileDescriptorProto] = []
        seen: set[str] = set()

        def visit(names: Iterable[str]) -> None:
            for n in names:
                if n not in seen:
                    seen.add(n)
                    proto = self._proto(n)
                    ordered.append(proto)
                    visit(proto.dependency)

        visit([name])
        return rpb.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=rpb.FileDescriptorResponse(
                file_descriptor_proto=[p.SerializeToString() for p in ordered]
            ),
        )


def _error(
    request: rpb.ServerReflectionRequest, code: grpc.StatusCode, message: str
) -> rpb.ServerReflectionResponse:
    return rpb.ServerReflectionResponse(
        original_request=request,
        error_response=rpb.ErrorResponse(error_code=code.value[0], error_message=message),
    )


def enable(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    server.add_generic_rpc_handlers(ReflectionService(service_names).handlers())
