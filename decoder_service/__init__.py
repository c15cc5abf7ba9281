"""The gRPC decoder service: answers prompts about stored context trees, streaming tokens.

Thin by design: servicer.py converts protobuf to ContextRuntime calls, server.py describes the
service to the shared bootstrap in sharedllm.common.rpc. Run it with `sharedllm serve decoder`.
"""

DEFAULT_PORT = 50052  # here, not in server.py, so that `sharedllm serve --help` loads no model
DEFAULT_MAX_CONCURRENT = 16  # answers in flight share batched model steps (scheduler.py)
