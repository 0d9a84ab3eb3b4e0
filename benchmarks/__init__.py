"""Benchmarks and evaluation worlds for diffalign (GenEval rules, toy worlds)."""
