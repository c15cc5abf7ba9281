"""Training the injection adapter (docs/method.md §6)."""
