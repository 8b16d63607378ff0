"""Benchmarks of the training step and of generation (``minigpt bench``, :mod:`minigpt.tools.bench.cli`)."""
