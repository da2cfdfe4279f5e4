"""Load tests and benchmarks. Each prints a table; none is a test (tests never assert on speed)."""
