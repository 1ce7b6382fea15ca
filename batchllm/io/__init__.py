"""Batch files: reading request lines, writing results."""
