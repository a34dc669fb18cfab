"""Parallel execution: sequence-parallel prefill (Ulysses all-to-all)."""
