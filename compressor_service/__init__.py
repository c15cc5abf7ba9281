"""The gRPC compressor service: turns documents into context trees stored in Redis.

Thin by design: servicer.py converts protobuf to ContextRuntime calls, server.py describes the
service to the shared bootstrap in sharedllm.common.rpc. Run it with `sharedllm serve compressor`.
"""
