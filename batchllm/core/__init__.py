"""Torch-free engine core: block pool, KV-cache bookkeeping, scheduler, engine step."""
