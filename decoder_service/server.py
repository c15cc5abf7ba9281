"""The decoder service as the shared bootstrap (sharedllm.common.rpc.server) starts it."""

from __future__ import annotations

import grpc

from sharedllm.common.generated.sharedllm.v1 import decoder_pb2, decoder_pb2_grpc
from sharedllm.common.rpc.server import ServerState, ServiceSpec
from sharedllm.decoder_service import DEFAULT_PORT
from sharedllm.decoder_service.servicer import DecoderServicer


def register(state: ServerState, server: grpc.aio.Server) -> None:
    decoder_pb2_grpc.add_DecoderServiceServicer_to_server(DecoderServicer(state), server)


SPEC = ServiceSpec(
    name="decoder",
    full_name=decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name,
    default_port=DEFAULT_PORT,
    register=register,
    lower_only=False,
)
