"""The engine: lower model, context trees, retrieval, injection and generation. No gRPC here."""
