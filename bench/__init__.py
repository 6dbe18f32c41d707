"""Benchmarks of the control plane (run from the repository root: ``python -m bench.api_load``)."""
