"""The paper's benchmarks (VoiceBench, AIR-Bench chat and foundation), run by benchmarks.py:
bench_data reads their files, bench_rules and bench_scoring score answers as the official code."""
