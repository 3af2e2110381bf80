"""Benchmarks (speed, quality); run as scripts or `python -m benchmarks.quality.run`."""
