"""One-off studies: each answered one question once (docs/performance.md, docs/gpu.md, docs/results.md
quote their numbers beside their commands). Run as modules from the repository root:
``python -m benchmarks.studies.NAME``."""
