"""The gRPC compressor service: turns documents into context trees stored in Redis.

Thin by design: servicer.py converts protobuf to ContextRuntime calls, server.py describes the
service to the shared bootstrap in sharedllm.common.rpc. Run it with `sharedllm serve compressor`.
"""

DEFAULT_PORT = 50051  # here, not in server.py, so that `sharedllm serve --help` loads no model
DEFAULT_MAX_CONCURRENT = 4  # compressions each use the whole CPU or GPU; more only queue
