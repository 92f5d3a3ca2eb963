"""Server reflection that also answers lookups of methods and fields, under both protocol versions.

ghz and grpcurl ask for `bild.v1.Generator.Generate`. grpcio-reflection hands that name to
protobuf's DescriptorPool.FindFileContainingSymbol, which (with protobuf 7's upb backend) knows
services and messages but not their members, so the lookup fails. We resolve a member by its parent.
grpcio-reflection also serves only `grpc.reflection.v1alpha`; newer clients ask `grpc.reflection.v1`
first. The two protocols have identical messages, so the same servicer serves both.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha._base import _file_descriptor_response, _not_found_error

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


def _member_file(pool: descriptor_pool.DescriptorPool, name: str):
    """The file of a service method, message field or enum value named by its full name, or None."""
    parent, _, member = name.rpartition(".")
    for find, members in (
        (pool.FindServiceByName, lambda d: d.methods_by_name),
        (pool.FindMessageTypeByName, lambda d: {**d.fields_by_name, **d.oneofs_by_name}),
        (pool.FindEnumTypeByName, lambda d: d.values_by_name),
    ):
        try:
            descriptor = find(parent)
        except KeyError:
            continue
        if member in members(descriptor):
            return descriptor.file
    return None


class MemberAwareReflectionServicer(ReflectionServicer):
    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            descriptor = self._pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            descriptor = _member_file(self._pool, fully_qualified_name)
            if descriptor is None:
                return _not_found_error(request)
        return _file_descriptor_response(descriptor, request)


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    servicer = MemberAwareReflectionServicer([*service_names, V1ALPHA_SERVICE, V1_SERVICE])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),)
    )
