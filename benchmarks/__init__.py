"""llmfab benchmarks (issue #9): `python -m benchmarks` runs every section and prints its tables."""
