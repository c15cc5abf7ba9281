"""The compressor service as the shared bootstrap (sharedllm.common.rpc.server) starts it."""

from __future__ import annotations

import grpc

from sharedllm.common.generated.sharedllm.v1 import compressor_pb2, compressor_pb2_grpc
from sharedllm.common.rpc.server import ServerState, ServiceSpec
from sharedllm.compressor_service import DEFAULT_PORT
from sharedllm.compressor_service.servicer import CompressorServicer


def register(state: ServerState, server: grpc.aio.Server) -> None:
    compressor_pb2_grpc.add_CompressorServiceServicer_to_server(CompressorServicer(state), server)


SPEC = ServiceSpec(
    name="compressor",
    full_name=compressor_pb2.DESCRIPTOR.services_by_name["CompressorService"].full_name,
    default_port=DEFAULT_PORT,
    register=register,
    lower_only=True,
)
