"""Training the injection adapter (method.md §6)."""
