"""Shared code of the SharedLLM serving system: config, model loading, the engine, kernels, stores."""
