"""Benchmarks behind `zeroc bench`: forward, attention, KV transfer, prefix reuse and the serving load test."""
