"""The parts of `benchmarks/bench_adapters.py`, one module per thing measured."""
