"""Command lines, one-line errors, devices, torchrun, and the context a stage runs in."""
