"""gRPC plumbing shared by the compressor and decoder services.

Everything a service needs besides its own protobuf <-> runtime conversion lives here, once:
configuration from flags and environment, API keys, the interceptor that authenticates and maps
errors to status codes, the worker pool that runs the model off the event loop with a
concurrency limit, health that follows the store, and the server bootstrap (reflection,
message-size limits, graceful drain on SIGTERM).
"""
