"""Benchmarks: run each as a module from the tree's top, `python -m benchmarks.NAME` (Makefile:
bench, bench-sge; docs/performance.md)."""
