"""The gRPC decoder service: answers prompts about stored context trees, streaming tokens.

Thin by design: servicer.py converts protobuf to ContextRuntime calls, server.py describes the
service to the shared bootstrap in common.rpc. Run it with `sharedllm serve decoder` or
`python -m decoder_service`.
"""
