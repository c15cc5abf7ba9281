"""The gRPC decoder service: answers prompts about stored context trees, streaming tokens.

Thin by design: servicer.py converts protobuf to ContextRuntime calls, server.py describes the
service to the shared bootstrap in sharedllm.common.rpc. Run it with `sharedllm serve decoder`.
"""
