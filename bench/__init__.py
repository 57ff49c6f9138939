"""Benchmarks: speed and memory of odenets_fast against the alternatives (run as `python -m bench.<name>`)."""
