"""Benchmarks run as ``python -m tools.bench.NAME``; each prints ratios against a baseline of the same run."""
