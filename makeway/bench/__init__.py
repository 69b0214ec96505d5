"""Workload generation and measurement shared by the demo and the benchmarks."""
