"""The checks of `benchmarks/gpu_checks.py`, one module each, and the pieces they share."""
