"""Registering a servicer with a gRPC server so that it may answer with bytes serialized
beforehand as well as with messages."""

from __future__ import annotations

from typing import Any

import grpc

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb


def _serialize(message: Any) -> bytes:
    """Responses are messages, or bytes serialized beforehand: ListNodes assembles its
    answer from cached node statuses; a command to 10,000 agents is serialized once."""
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def add_service(name: str, servicer: Any, server: Any) -> None:
    """Like the generated add_<Name>Servicer_to_server, with _serialize for responses."""
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers = {}
    for method in service.methods:
        request = getattr(pb, method.input_type.name)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
