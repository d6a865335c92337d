"""Triton GPU kernels for the recurrences (run on the CPU under TRITON_INTERPRET=1 for tests)."""
