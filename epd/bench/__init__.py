"""Benchmarks against a peer server: `epd bench serve` / `epd bench compare`."""
