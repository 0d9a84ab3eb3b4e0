"""Performance benchmarks (baseline vs diffalign in one process)."""
