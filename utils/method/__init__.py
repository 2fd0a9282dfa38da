"""The method's math: pure functions on tensors (no files, loaders, flags or prints)."""
