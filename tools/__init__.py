"""Command-line tools: synthetic data, shard building, benchmarks, run comparison."""
