"""Benchmark scripts: ratios measured side by side in one run (`python -m edgeq.benchmarks.<name>`)."""
