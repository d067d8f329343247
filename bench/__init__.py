"""Speed benchmarks (results in BENCHMARKS.md). Each file runs as `python -m bench.NAME`."""
