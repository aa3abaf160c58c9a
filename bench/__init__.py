"""Speed benchmarks, run as modules from the repository root (``python -m bench.serve``)."""
