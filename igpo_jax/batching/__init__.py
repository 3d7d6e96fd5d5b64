"""Batching of update rows: token-budget packing (packing.py)."""
